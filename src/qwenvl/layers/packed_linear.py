"""Linear layers with compact weights for CPU decoding: bf16 or fp16, or int8 with per-row scales.

A decode step multiplies a few activation rows by every weight of the decoder, so it is bound by
how fast the weights stream from memory. ``PackedLinear`` keeps the weight in 2 bytes (bf16) or 1
byte (int8 + one fp32 scale per output row) and computes in the activation dtype (fp32 on the
CPU): small row counts go through our GEMV kernels (``qwenvl.kernels``: the weight is read once
for all rows), larger ones (prefill) through torch's GEMM on a weight expanded for that call,
where the arithmetic, not the bytes, is the cost.

That GEMM runs in float32 by default (exact for bf16 weights). ``gemm_dtype = torch.bfloat16``
(``LLM(prefill_dtype="bfloat16")``) multiplies the bf16 weight as stored by the activations
rounded to bf16, in oneDNN's bf16 GEMM: on CPUs with bf16 dot-product instructions (AVX512-BF16,
AMX) about 3x float32's speed with no expanded weight, at the cost of rounding the GEMM's inputs
and its output to bf16 (torch's CPU GEMM has no float32-output variant for bf16 inputs); the
residual stream, norms and decoding stay float32.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl import kernels

# "16bit": bf16 or fp16, whichever the checkpoint holds (decided at ``allocate``: an AWQ/GPTQ
# release's fp16 LM head stays exact instead of widening to fp32 or rounding to bf16)
MODES = ("bf16", "fp16", "16bit", "int8")
KERNEL_MAX_ROWS = 16  # the GEMV kernels' row limit; beyond it GEMM wins anyway
SCRATCH_MAX_ELEMENTS = 64 * 2**20  # larger weights (a vocabulary head) expand into fresh memory

_local = threading.local()


def native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX): without them
    oneDNN emulates the bf16 GEMM, slower than float32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def set_gemm_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """The dtype of every bf16 ``PackedLinear``'s prefill GEMM (see the module's docstring);
    returns how many layers it applies to."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"a packed prefill GEMM runs in float32 or bfloat16, not {dtype}")
    layers = [m for m in model.modules() if isinstance(m, PackedLinear) and m.mode == "bf16"]
    for m in layers:
        m.gemm_dtype = dtype
    return len(layers)


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


def pack_linears(module: nn.Module, gemm_dtype: torch.dtype) -> int:
    """Every ``nn.Linear`` under ``module`` (a vision tower's) replaced by a bf16
    ``PackedLinear`` whose GEMM runs in ``gemm_dtype``; returns how many. Its weights round to
    bf16: exact for a 16-bit checkpoint (the released ones), an approximation of a float32 one."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            packed = PackedLinear.from_dense(child.weight, child.bias, "bf16")
            packed.gemm_dtype = gemm_dtype
            setattr(module, name, packed)
            count += 1
        else:
            count += pack_linears(child, gemm_dtype)
    return count


def load_targets(
    weight: torch.Tensor, bias: torch.Tensor | None, parts: dict[str, int] | None
) -> dict[str, torch.Tensor]:
    """The tensors a compact linear's loader fills, by checkpoint name: ``weight``/``bias`` of
    the layer itself, or, for a fused layer, the row slices of each part (``q_proj.weight``...,
    relative to the parent module)."""
    if parts is None:
        return {"weight": weight} | ({} if bias is None else {"bias": bias})
    out, row = {}, 0
    for name, rows in parts.items():
        out[f"{name}.weight"] = weight[row : row + rows]
        if bias is not None:
            out[f"{name}.bias"] = bias[row : row + rows]
        row += rows
    return out


def from_dense(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """Fill a compact linear built empty for ``weight``'s ``[out, in]`` shape the way the loader
    does (``allocate``, copy, ``finish_loading``): the one path from a dense weight."""
    targets = module.allocate(weight.device, weight.dtype)
    targets["weight"].copy_(weight.detach())
    if bias is not None:
        targets["bias"].copy_(bias.detach())
    module.finish_loading()
    return module


class PackedLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored packed; inference only (no gradients).

    Built empty (on the meta device while the model is built), then filled by the loader:
    ``allocate`` gives the tensors the checkpoint's ``[out, in]`` weights are read into (by
    name: a fused layer's ``parts`` are the checkpoint's separate linears, stacked along the
    output rows), ``finish_loading`` packs them.
    """

    gemm_dtype = torch.float32  # the prefill GEMM's; ``set_gemm_dtype``
    # a bf16 GEMM's output handed on as bf16, not widened to the input's dtype: for a consumer
    # that takes bf16 as it is (the MLP's gate, whose output feeds the next bf16 GEMM)
    bf16_output = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        mode: str,
        parts: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"packed weight mode must be one of {MODES}, got {mode!r}")
        if parts is not None and sum(parts.values()) != out_features:
            raise ValueError(f"parts {parts} do not add up to {out_features} output rows")
        self.mode = mode
        self.in_features, self.out_features = in_features, out_features
        self.parts = parts
        shape = (out_features, in_features)
        if mode == "int8":
            self.register_buffer("qweight", torch.empty(shape, dtype=torch.int8))
            self.register_buffer("scale", torch.empty(out_features))
        else:
            self.register_buffer("weight", torch.empty(shape, dtype=torch.bfloat16))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)
        self._staging: torch.Tensor | None = None  # int8: the 16-bit weight until packed

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> PackedLinear:
        """A packed copy of a dense ``[out, in]`` weight (and bias)."""
        out, inp = weight.shape
        with torch.device(weight.device):
            return from_dense(cls(inp, out, bias is not None, mode), weight, bias)

    def allocate(self, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Allocate the buffers on ``device``; return what the loader reads the checkpoint into,
        by name relative to this module (``weight``, ``bias``) or, for a fused layer, to its
        parent (``q_proj.weight``...). ``dtype``: the checkpoint's, for int8's staging copy."""
        shape = (self.out_features, self.in_features)
        if self.mode == "int8":
            self._staging = weight = torch.empty(shape, dtype=dtype, device=device)
            self.scale = torch.empty(self.out_features, device=device)
        else:
            if self.mode == "16bit":
                self.mode = "fp16" if dtype == torch.float16 else "bf16"
            store = torch.float16 if self.mode == "fp16" else torch.bfloat16
            self.weight = weight = torch.empty(shape, dtype=store, device=device)
        if self.bias is not None:
            self.bias = torch.empty(self.out_features, device=device)
        return load_targets(weight, self.bias, self.parts)

    def finish_loading(self) -> None:
        """Pack what the loader read: int8 quantises per output row (and tiles where that
        decodes faster); both move big weights into huge pages."""
        if self.mode == "int8":
            assert self._staging is not None, "allocate() first"
            q, self.scale = kernels.quantize_int8(self._staging)
            self._staging = None
            if kernels.tiles_pay(*q.shape):  # one sequential stream per 8 short rows (decode)
                q = kernels.tile_int8(q)
            self.qweight = kernels.huge_page_copy(q)
        else:
            self.weight = kernels.huge_page_copy(self.weight)

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
        if self.mode != "int8" and stored.dtype == dtype:  # a GPU in the checkpoint's dtype
            return stored
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
        if self.gemm_dtype == torch.bfloat16 and self.mode == "bf16" and x.dtype != torch.bfloat16:
            y = F.linear(x.to(torch.bfloat16), self.weight)
            y = y if self.bf16_output else y.to(x.dtype)
            return y if bias is None else y.add_(bias)
        b = None if bias is None else bias.to(x.dtype)
        return F.linear(x, self.dense_weight(x.dtype), b)
