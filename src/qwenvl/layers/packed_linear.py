"""Linear layers with compact weights for CPU decoding: bf16, or int8 with per-row scales.

A decode step multiplies a few activation rows by every weight of the decoder, so it is bound by
how fast the weights stream from memory. ``PackedLinear`` keeps the weight in 2 bytes (bf16) or 1
byte (int8 + one fp32 scale per output row) and computes in the activation dtype (fp32 on the
CPU): small row counts go through our GEMV kernels (``qwenvl.kernels``: the weight is read once
for all rows), larger ones (prefill) through torch's GEMM on a weight expanded for that call,
where the arithmetic, not the bytes, is the cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl import kernels

MODES = ("bf16", "int8")
KERNEL_MAX_ROWS = 16  # the GEMV kernels' row limit; beyond it GEMM wins anyway


class PackedLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored packed; inference only (no gradients)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"packed weight mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.out_features, self.in_features = weight.shape
        w = weight.detach()
        if mode == "int8":
            q, scale = kernels.quantize_int8(w)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
        else:
            self.register_buffer("weight", w.to(torch.bfloat16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}"

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight expanded to ``dtype`` (int8: dequantised)."""
        if self.mode == "int8":
            return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias
        if x2.shape[0] <= KERNEL_MAX_ROWS and x.device.type == "cpu" and kernels.available():
            x2 = x2.contiguous()
            if self.mode == "int8":
                y = kernels.linear_int8(x2, self.qweight, self.scale, bias)
            else:
                y = kernels.linear_bf16(x2, self.weight, bias)
        else:
            b = None if bias is None else bias.to(x.dtype)
            y = F.linear(x2, self.dense_weight(x.dtype), b)
        return y.view(*shape[:-1], self.out_features)


def decoder_linears(model: nn.Module) -> list[str]:
    """Names of the language model's linear layers (attention, MLP) and the LM head."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (name.startswith("model.layers.") or name == "lm_head"):
            names.append(name)
    return names


def pack_linears(model: nn.Module, mode: str) -> int:
    """Replace the decoder's ``nn.Linear`` layers (and the LM head) by ``PackedLinear``.

    The LM head of a tied model gets its own packed copy of the embedding matrix; the embedding
    itself stays in the activation dtype. Returns the number of layers packed.
    """
    names = decoder_linears(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, PackedLinear(old.weight, old.bias, mode))
        del old
    return len(names)


def packed_mode(model: nn.Module) -> str | None:
    """The mode of the model's packed layers, or None when it has none."""
    for m in model.modules():
        if isinstance(m, PackedLinear):
            return m.mode
    return None
