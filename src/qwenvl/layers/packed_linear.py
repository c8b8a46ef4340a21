"""Linear layers with compact weights for CPU decoding: bf16, or int8 with per-row scales.

A decode step multiplies a few activation rows by every weight of the decoder, so it is bound by
how fast the weights stream from memory. ``PackedLinear`` keeps the weight in 2 bytes (bf16) or 1
byte (int8 + one fp32 scale per output row) and computes in the activation dtype (fp32 on the
CPU): small row counts go through our GEMV kernels (``qwenvl.kernels``: the weight is read once
for all rows), larger ones (prefill) through torch's GEMM on a weight expanded for that call,
where the arithmetic, not the bytes, is the cost.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl import kernels

MODES = ("bf16", "int8")
KERNEL_MAX_ROWS = 16  # the GEMV kernels' row limit; beyond it GEMM wins anyway
SCRATCH_MAX_ELEMENTS = 64 * 2**20  # larger weights (a vocabulary head) expand into fresh memory

_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread buffer the expanded weights of a prefill are written into, layer after layer:
    a fresh 50 MB allocation per linear costs page faults that show up in time to first token."""
    if numel > SCRATCH_MAX_ELEMENTS:
        return torch.empty(numel, dtype=dtype, device=device)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get((dtype, device))
    if buf is None or buf.numel() < numel:
        # a normal tensor even when first needed under inference_mode: an inference tensor
        # could not be written to by a later call outside it
        with torch.inference_mode(False):
            buf = bufs[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


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
            if kernels.tiles_pay(*q.shape):  # one sequential stream per 8 short rows (decode)
                q = kernels.tile_int8(q)
            self.register_buffer("qweight", kernels.huge_page_copy(q))
            self.register_buffer("scale", scale)
        else:
            self.register_buffer("weight", kernels.huge_page_copy(w.to(torch.bfloat16)))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}"

    def int8_rows(self) -> torch.Tensor:
        """The int8 weight as ``[out, in]`` (a copy when it is stored tiled)."""
        q = self.qweight
        return kernels.untile_int8(q) if q.dim() == 4 else q

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight expanded to ``dtype`` (int8: dequantised), in a scratch buffer that the
        next call overwrites: use it at once."""
        stored = self.qweight if self.mode == "int8" else self.weight
        out = _scratch(stored.numel(), dtype, stored.device)
        if self.mode != "int8":
            return out.view(stored.shape).copy_(self.weight)
        scale = self.scale.to(dtype)
        if stored.dim() == 4:  # tiled: permuted back to [out/8, 8, in/16, 16] by the multiply
            q = stored.permute(0, 2, 1, 3)
            torch.mul(q, scale.view(q.shape[0], q.shape[1], 1, 1), out=out.view(q.shape))
            return out.view(self.out_features, self.in_features)
        return torch.mul(stored, scale[:, None], out=out.view(stored.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.mm(x.reshape(-1, self.in_features))
        return y.view(*shape[:-1], self.out_features)

    def kernel_params(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(weight, scale, bias) as ``kernels.decode_layers`` takes them (scale: int8 only), read
        from the buffer dict: ``nn.Module.__getattr__`` is slow enough to show in a decode step."""
        b = self._buffers
        if self.mode == "int8":
            return b["qweight"], b["scale"], b["bias"]
        return b["weight"], None, b["bias"]

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` for a 2-D ``x [rows, in]``, without the module call around it."""
        bias = self.bias
        if x.shape[0] <= KERNEL_MAX_ROWS and x.device.type == "cpu" and kernels.available():
            x = x.contiguous()
            if self.mode == "int8":
                return kernels.linear_int8(x, self.qweight, self.scale, bias)
            return kernels.linear_bf16(x, self.weight, bias)
        b = None if bias is None else bias.to(x.dtype)
        return F.linear(x, self.dense_weight(x.dtype), b)


def decoder_linears(model: nn.Module) -> list[str]:
    """Names of the language model's linear layers (attention, MLP) and the LM head."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (name.startswith("model.layers.") or name == "lm_head"):
            names.append(name)
    return names


def pack_linears(model: nn.Module, mode: str) -> int:
    """Replace the decoder's ``nn.Linear`` layers (and the LM head) by ``PackedLinear``; q/k/v
    and gate/up are fused into one packed weight each (``qkv_proj``, ``gate_up_proj``).

    The LM head of a tied model gets its own packed copy of the embedding matrix; the embedding
    itself stays in the activation dtype. Returns the number of layers packed.
    """
    names = decoder_linears(model)
    fused = set()
    for name, m in model.named_modules():  # q/k/v and gate/up share their input: fuse them
        if hasattr(m, "qkv_proj") and isinstance(getattr(m, "q_proj", None), nn.Linear):
            parts = [m.q_proj, m.k_proj, m.v_proj]
            bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
            m.qkv_proj = PackedLinear(torch.cat([p.weight for p in parts]), bias, mode)
            del m.q_proj, m.k_proj, m.v_proj
            fused.update(f"{name}.{c}" for c in ("q_proj", "k_proj", "v_proj"))
        if hasattr(m, "gate_up_proj") and isinstance(getattr(m, "gate_proj", None), nn.Linear):
            w = torch.cat([m.gate_proj.weight, m.up_proj.weight])
            m.gate_up_proj = PackedLinear(w, None, mode)
            del m.gate_proj, m.up_proj
            fused.update(f"{name}.{c}" for c in ("gate_proj", "up_proj"))
    for name in names:
        if name in fused:
            continue
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
