"""Attention kernels: variable-length non-causal attention for the ViT, causal attention for the
LLM.

The reference path is PyTorch SDPA on CPU. Segments of equal length are stacked and run as one
batched call, so window attention over many same-sized windows costs one kernel launch, not one per
window. On CUDA with flash-attn installed and a 16-bit model, the ViT's segments go through
``flash_attn_varlen_func`` instead (the LLM's paged attention stays on SDPA). Under bf16 prefill
(``set_attention_dtype(visual, torch.bfloat16)``) a CPU with bf16 dot products runs them in
``kernels.bf16_attention``, which never materialises the scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl import kernels

try:  # optional CUDA kernel: one launch for all segments, no padding
    from flash_attn import flash_attn_varlen_func
except ImportError:  # CPU machines and CUDA installs without flash-attn use SDPA
    flash_attn_varlen_func = None


_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def set_attention_dtype(module: nn.Module, dtype: torch.dtype) -> int:
    """The dtype the products of every attention under ``module`` that takes one (an
    ``attention_dtype`` attribute: the vision towers') run in; returns how many."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"attention products run in float32 or bfloat16, not {dtype}")
    layers = [m for m in module.modules() if hasattr(m, "attention_dtype")]
    for m in layers:
        m.attention_dtype = dtype
    return len(layers)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: list[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Block-diagonal (per segment) non-causal attention.

    Args:
        q, k, v: ``[N, heads, head_dim]``. cu_seqlens: segment boundaries ``[0, ..., N]`` (a Python
        list: the bookkeeping is host-side). dtype: ``torch.bfloat16`` lets float32 inputs on a
        CPU with bf16 dot products run ``kernels.bf16_attention`` (q, k, v and the softmax
        weights rounded to bf16); elsewhere, and for float32, the products are in q's dtype.

    Returns:
        ``[N, heads, head_dim]``.
    """
    n = q.shape[0]
    if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in _FLASH_DTYPES:
        cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=q.device)
        longest = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
        return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest)
    if dtype == torch.bfloat16 and kernels.bf16_attention_applies(q):
        return kernels.bf16_attention(q, k, v, cu_seqlens)
    if len(cu_seqlens) == 2:
        return _sdpa_segments(q, k, v, torch.arange(n, device=q.device).view(1, n))
    by_len: dict[int, list[int]] = {}
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if end > start:
            by_len.setdefault(end - start, []).append(start)
    out = None
    for length, starts in by_len.items():
        idx = torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)
        part = _sdpa_segments(q, k, v, idx).flatten(0, 1)
        if out is None:  # under autocast the attention's dtype is not q's (bf16 for float32)
            out = q.new_empty(q.shape, dtype=part.dtype)
        out[idx.flatten()] = part
    return out if out is not None else torch.empty_like(q)


def _sdpa_segments(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """Attention within each row of ``idx`` ([segments, length]); returns [segments, length, H,
    D].
    """
    qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # [S, H, len, D]
    return F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Grouped-query attention of ``q [B, H, Lq, D]`` over ``k, v [B, Hkv, Lk, D]``.

    ``mask`` is a boolean ``[B, 1, Lq, Lk]`` (True = may attend) or None for a plain causal square.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if mask is None:
        if q.shape[2] > 1 and q.shape[2] != k.shape[2]:
            raise ValueError("a mask is required when queries do not cover all keys")
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
