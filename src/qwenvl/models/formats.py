"""Weight formats: how a model's decoder linears are stored, chosen before the model is built.

A family's modules ask the format for their linear layers (``fmt.linear(...)``); None means plain
``nn.Linear`` (dense, trainable: what training and LoRA use). A compact format builds its own
modules on the meta device, and the loader fills them from the checkpoint's names through their
``allocate`` / ``finish_loading`` (``qwenvl.checkpoint.load_model``). A new format (int4, AWQ,
GPTQ) is a module class with those two methods plus an entry in ``FORMATS``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from qwenvl import kernels
from qwenvl.errors import ConfigError
from qwenvl.layers.packed_linear import PackedLinear
from qwenvl.models.interface import WeightFormat
from qwenvl.models.quantized import Quantized, format_for, format_named


@dataclass(frozen=True)
class Packed(WeightFormat):
    """bf16 weights, or int8 with one fp32 scale per output row (``PackedLinear``), read by our
    CPU GEMV kernels."""

    def linear(
        self, in_features: int, out_features: int, bias: bool, parts: dict[str, int] | None = None
    ) -> nn.Module:
        return PackedLinear(in_features, out_features, bias, self.name, parts)


@dataclass(frozen=True)
class Int4(WeightFormat):
    """Our own int4: a 16-bit checkpoint's decoder linears quantised at load, group-wise
    asymmetric in groups of ``group_size`` (``Int4Linear``), read by the int4 GEMV kernels; the LM
    head in ``head_mode``: "bf16" (the default: 16-bit unless asked), "int8" (``PackedLinear``,
    per-row scales) or "int4" (``Int4Linear``). The head streams every decode step (a 2B's is
    0.23 G weights, 18 % of the decoder's), so a compact head is most of what separates int4
    decode from llama.cpp's Q4 files, whose head is Q6_K. The vision tower stays as it is.
    """

    group_size: int = 128
    head_mode: str = "bf16"

    def linear(
        self, in_features: int, out_features: int, bias: bool, parts: dict[str, int] | None = None
    ) -> nn.Module:
        from qwenvl.layers.int4_linear import Int4Linear

        group = self.group_size  # halved for narrow layers (the tiny test models): 64, 32
        while in_features % group and group > 32:
            group //= 2
        return Int4Linear(in_features, out_features, bias, group, parts)

    def head(self, in_features: int, out_features: int) -> nn.Module | None:
        if self.head_mode == "int4":
            return self.linear(in_features, out_features, bias=False)
        return PackedLinear(in_features, out_features, False, self.head_mode)


HEAD_MODES = ("bf16", "int8", "int4")  # Int4.head_mode: name "int4:head-int8", "int4:head-int4"

FORMATS: dict[str, WeightFormat] = {
    "bf16": Packed("bf16"),
    "int4": Int4("int4"),
    "int8": Packed("int8"),
    "awq": Quantized("awq:w4g128", method="awq"),
    "gptq": Quantized("gptq:w4g128"),
}


def get_format(name: str | None) -> WeightFormat | None:
    """The format called ``name``; None (or ``"dense"``) for plain ``nn.Linear``."""
    if name in (None, "dense"):
        return None
    base, _, head = name.partition(":head-")
    if base == "int4" and head in HEAD_MODES:
        return replace(FORMATS["int4"], name=name, head_mode=head)
    if name not in FORMATS:
        fmt = format_named(name)  # a checkpoint's own AWQ/GPTQ layout ("gptq:w8g128")
        if fmt is not None:
            return fmt
        raise ConfigError(f"unknown weight format {name!r}; use dense or one of {list(FORMATS)}")
    return FORMATS[name]


# Packed bf16 decode weights pay when weights stream from DRAM; a checkpoint smaller than this
# (the demo model) runs as fast unpacked and needs no compiled extension.
PACK_MIN_BYTES = 64 * 2**20


def plan_weights(
    *,
    dtype: str | torch.dtype,
    stored: torch.dtype,
    checkpoint_bytes: int,
    on_cpu: bool,
    quantization: str | None = None,
    pack_weights: bool | None = None,
    lora: bool = False,
    quantization_config: dict | None = None,
    head_quantization: str | None = None,
) -> tuple[str | torch.dtype, str | None]:
    """(activation dtype, weight format name or None) for loading a checkpoint.

    ``quantization="int8"``: int8 weights, float32 activations on the CPU; ``"int4"``: 4-bit
    decoder weights (group 128) and a bf16 LM head, float32 activations on the CPU;
    ``head_quantization`` ("int8" or "int4", only with int4) quantises its LM head too.
    ``pack_weights``: True packs the decoder's weights in bf16 under float32 activations, False
    never; None (the default) packs on the CPU when ``dtype`` is ``auto``, the checkpoint is
    16-bit and at least ``PACK_MIN_BYTES``, no LoRA adapter is applied and the kernels are built.

    ``quantization_config`` (the checkpoint's own, from config.json): an AWQ or GPTQ checkpoint
    loads in its own format (:class:`Quantized`; float32 activations on the CPU), any other
    method is refused; ``quantization`` and ``pack_weights`` cannot re-quantise it.
    """
    if quantization_config is not None:
        fmt = format_for(quantization_config)
        if quantization or pack_weights:
            option = "quantization" if quantization else "pack_weights"
            raise ConfigError(f"the checkpoint is already quantised ({fmt.name}); drop {option}")
        if lora:
            raise ConfigError("a LoRA adapter cannot be applied to a quantised checkpoint")
        return ("float32" if dtype == "auto" and on_cpu else dtype), fmt.name
    if quantization not in (None, "int8", "int4"):
        raise ConfigError(f"unknown quantization {quantization!r}; use 'int8', 'int4' or None")
    if (quantization or pack_weights) and lora:
        raise ConfigError("compact weights cannot be combined with a LoRA adapter; merge it first")
    if head_quantization not in (None, "int8", "int4"):
        raise ConfigError(f"unknown head_quantization {head_quantization!r}; use 'int8' or 'int4'")
    if head_quantization and quantization != "int4":
        raise ConfigError(
            "head_quantization applies to quantization='int4' (int8 already quantises the head)"
        )
    if quantization in ("int8", "int4"):
        name = f"int4:head-{head_quantization}" if head_quantization else quantization
        return ("float32" if dtype == "auto" and on_cpu else dtype), name
    if pack_weights:
        return ("float32" if dtype == "auto" else dtype), "bf16"
    auto = pack_weights is None and on_cpu and dtype == "auto" and not lora
    if auto and stored.itemsize == 2:
        if checkpoint_bytes < PACK_MIN_BYTES:
            return "float32", None
        if kernels.available():
            return "float32", "bf16"
    return dtype, None
