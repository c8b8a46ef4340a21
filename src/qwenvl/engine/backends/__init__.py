"""Decoder backends: who runs the decoder layers of an engine step.

The runner asks each registered backend, in order, whether it ``supports`` the model (its
declared :class:`~qwenvl.models.DecoderLayout`, device and dtype) and uses the first that does.
A new backend (CUDA graphs, tensor parallel) is a module here plus an entry in ``BACKENDS``;
``QWENVL_KERNELS=0`` turns the CPU kernels off, so ``cpu_kernels`` declines and ``torch`` runs.
"""

from __future__ import annotations

from qwenvl.engine.backends.base import DecoderBackend
from qwenvl.engine.backends.cpu_kernels import CpuKernelBackend
from qwenvl.engine.backends.torch_eager import TorchBackend
from qwenvl.errors import ConfigError
from qwenvl.models import VLModel

BACKENDS: list[type[DecoderBackend]] = [CpuKernelBackend, TorchBackend]


def select_backend(model: VLModel, name: str | None = None) -> DecoderBackend:
    """The first backend that supports ``model`` (or the one called ``name``, if it does)."""
    layout = model.decoder_layout()
    for cls in BACKENDS:
        if name is not None and cls.name != name:
            continue
        if cls.supports(layout, model.device, model.dtype):
            return cls(model)
    known = [cls.name for cls in BACKENDS]
    raise ConfigError(f"decoder backend {name!r} does not support this model (known: {known})")


__all__ = ["BACKENDS", "DecoderBackend", "select_backend"]
