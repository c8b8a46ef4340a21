"""A linear layer with 4-bit weights for CPU decoding: group-wise asymmetric int4.

``w[n, k] = q[n, k] * scale[n, k // G] + min[n, k // G]`` with q in 0..15 and one (scale, min)
per ``G = group_size`` columns of a row (0.53 bytes per weight at G = 128: half a byte of nibbles
and two fp16 numbers per 128 weights). The weight is stored in the kernels' block layout
(``qwenvl.kernels.pack_int4``: tiles of 8 output rows, one sequential stream); decode steps of <=
16 rows run ``kernels.linear_int4`` (x rounded to int8 per row and group, integer dot products),
larger ones (prefill) expand the weight to float32 in a scratch buffer for torch's GEMM.

Two ways in: a 16-bit checkpoint quantised at load (``allocate`` / ``finish_loading``, as
``PackedLinear``), or already-quantised tensors (an AWQ/GPTQ checkpoint's loader calls
``load_quantized`` with q, scales and integer-unit zero points, and GPTQ's act-order ``perm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl import kernels
from qwenvl.layers.packed_linear import KERNEL_MAX_ROWS, _scratch, from_dense, load_targets

CHUNKED_MAX_ROWS = 64  # rows the GEMV kernel takes in chunks of 16 before a dequantised GEMM


class Int4Linear(nn.Module):
    """``y = x[..., perm] @ W^T + b`` with ``W`` in 4 bits; inference only.

    Built empty (on the meta device while the model is built); filled either by ``allocate`` +
    ``finish_loading`` (quantise a 16-bit weight: round-to-nearest from each group's range, then a
    least-squares refit of scale and min, ``kernels.quantize_int4``) or by ``load_quantized``.
    ``parts``: a fused layer's checkpoint linears by name with their output rows (as
    ``PackedLinear``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int = 128,
        parts: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if parts is not None and sum(parts.values()) != out_features:
            raise ValueError(f"parts {parts} do not add up to {out_features} output rows")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.parts = parts
        shape = self._packed_shape(out_features, in_features, group_size)
        self.register_buffer("packed", torch.empty(shape, dtype=self._packed_dtype))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)
        self.register_buffer("perm", None)
        self._staging: torch.Tensor | None = None  # the 16-bit weight until quantised

    bits = 4
    _packed_dtype = torch.uint8
    _packed_shape = staticmethod(kernels.int4_shape)
    _pack = staticmethod(kernels.pack_int4)

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 128
    ) -> Int4Linear:
        """A 4-bit copy of a dense ``[out, in]`` weight (and bias), quantised as at load."""
        out, inp = weight.shape
        with torch.device(weight.device):
            return from_dense(cls(inp, out, bias is not None, group_size), weight, bias)

    def allocate(self, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """What the loader reads a 16-bit checkpoint into, by name relative to this module
        (``weight``, ``bias``) or, for a fused layer, to its parent (``q_proj.weight``...)."""
        self._staging = weight = torch.empty(
            (self.out_features, self.in_features), dtype=dtype, device=device
        )
        if self.bias is not None:
            self.bias = torch.empty(self.out_features, device=device)
        return load_targets(weight, self.bias, self.parts)

    def finish_loading(self) -> None:
        """Quantise what ``allocate``'s tensors received (nothing to do after
        ``load_quantized``)."""
        if self._staging is None:
            return
        q, scale, minimum = kernels.quantize_int4(self._staging, self.group_size)
        self._staging = None
        self._store(q, scale, minimum)

    @torch.no_grad()
    def load_quantized(
        self,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
    ) -> None:
        """Take an already-quantised weight: ``w[n, k] = (q[n, k] - zeros[n, k // G]) *
        scales[n, k // G]`` with ``q`` uint8 ``[out, in]`` in 0..15, ``scales`` / ``zeros``
        ``[out, in // G]`` (zero points in q units, need not be integers). ``perm`` (GPTQ
        act-order): ``y = x[..., perm] @ w.T``. Scales and ``-zeros * scales`` are kept in fp16."""
        n, k, g = self.out_features, self.in_features, self.group_size
        if q.shape != (n, k):
            raise ValueError(f"q must be [{n}, {k}], got {tuple(q.shape)}")
        for name, t in (("scales", scales), ("zeros", zeros)):
            if t.shape != (n, k // g):
                raise ValueError(f"{name} must be [{n}, {k // g}], got {tuple(t.shape)}")
        top = 2**self.bits - 1
        if q.dtype != torch.uint8 or (q.numel() and int(q.max()) > top):
            raise ValueError(f"q must be uint8 with values 0..{top}")
        if perm is not None:
            if perm.shape != (k,):
                raise ValueError(f"perm must be [{k}], got {tuple(perm.shape)}")
            if not torch.equal(torch.sort(perm.long().cpu()).values, torch.arange(k)):
                raise ValueError("perm must be a permutation of the input features")
        if (bias is None) != (self.bias is None):
            raise ValueError("bias given for a layer built without one, or missing")
        device = q.device if self.packed.is_meta else self.packed.device
        s = scales.to(device=device, dtype=torch.float32)
        self._store(q.to(device), s, -zeros.to(device=device, dtype=torch.float32) * s)
        if bias is not None:
            self.bias = bias.detach().to(device=device, dtype=torch.float32).contiguous()
        self.perm = None if perm is None else perm.to(device=device, dtype=torch.long)

    def _store(self, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> None:
        self.packed = kernels.huge_page_copy(self._pack(q, scale, minimum))

    def extra_repr(self) -> str:
        perm = ", act-order" if self.perm is not None else ""
        g = self.group_size
        return f"in={self.in_features}, out={self.out_features}, int{self.bits} group={g}{perm}"

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantised ``[out, in]`` weight in ``dtype`` (columns in the order
        ``load_quantized`` got them, i.e. applied to ``x[..., perm]``), in a scratch buffer that
        the next call overwrites: use it at once."""
        n, k = self.out_features, self.in_features
        out = _scratch(n * k, torch.float32, self.packed.device).view(n, k)
        kernels.dequantize_int4(self.packed, n, out)
        return out if dtype == torch.float32 else out.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.mm(x.reshape(-1, self.in_features))
        return y.view(*shape[:-1], self.out_features)

    def kernel_params(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(packed weight, act-order perm or None, bias) as ``kernels.decode_layers`` takes
        them (the kernel gathers ``x[:, perm]`` while it rounds x to int8)."""
        b = self._buffers
        return b["packed"], b["perm"], b["bias"]

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` for a 2-D ``x [rows, in]``, without the module call around it. Up to
        ``CHUNKED_MAX_ROWS`` rows run the GEMV kernel 16 rows at a time: expanding the weight to
        float32 for a GEMM writes 8x its bytes, which a short prompt never earns back (a 7B AWQ
        model: 19 prompt tokens took 23 s that way, 15 took 1.3 s through the kernel)."""
        perm, bias = self._buffers["perm"], self.bias
        rows = x.shape[0]
        if rows <= CHUNKED_MAX_ROWS and x.device.type == "cpu" and kernels.available():
            x = x.contiguous()
            n, p = self.out_features, self.packed
            if rows <= KERNEL_MAX_ROWS:
                return kernels.linear_int4(x, p, n, bias, perm)
            parts = x.split(KERNEL_MAX_ROWS)
            return torch.cat([kernels.linear_int4(c, p, n, bias, perm) for c in parts])
        if perm is not None:
            x = x.index_select(1, perm)
        b = None if bias is None else bias.to(x.dtype)
        return F.linear(x, self.dense_weight(x.dtype), b)


class Int8GroupLinear(Int4Linear):
    """GPTQ-Int8's group-wise 8-bit weights in the same kernels (``kernels.pack_int8_groups``:
    tiles of 8 rows, signed bytes, fp16 scale and min per group; 1.03 bytes a weight at G = 128),
    so they decode in the fused step like int4 instead of being dequantised every call. Filled by
    ``load_quantized`` only (q in 0..255); quantising a 16-bit weight to it is not offered."""

    bits = 8
    _packed_dtype = torch.int8
    _packed_shape = staticmethod(kernels.int8_group_shape)
    _pack = staticmethod(kernels.pack_int8_groups)

    def allocate(self, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError("Int8GroupLinear loads GPTQ tensors (load_quantized) only")
