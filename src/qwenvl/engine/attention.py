"""Attention over the paged KV cache for one engine step: what a decoder layer calls with ``kv``.

The model hands over ``q, k, v`` before rotary with the step's ``cos, sin`` tables; the
implementation applies rotary, writes ``k, v`` into their cache slots and attends. Two
implementations: plain torch (every device, every step) and, for all-decode float32 CPU steps,
one kernel call per layer (``kernels.decode_attention``), whose bf16 prefills run in
``kernels.bf16_attention`` where the CPU has bf16 dot products. The decoder backend picks one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qwenvl import kernels
from qwenvl.engine.kv_cache import AttentionMetadata, PagedKVCache
from qwenvl.layers.attention import causal_attention
from qwenvl.layers.rotary import apply_rotary

# One prefill's attention: q [n, H, D], k and v [ctx, Hkv, D], its mask -> [n, H, D].
PrefillFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class TorchPagedAttention:
    """Rotary, cache write and SDPA with torch ops: prefill chunks one by one, decode rows
    batched with padded key slots and a mask."""

    def __init__(self, cache: PagedKVCache, meta: AttentionMetadata) -> None:
        self.cache = cache
        self.meta = meta

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``q [T, H*D]``, ``k, v [T, Hkv*D]`` before rotary, ``cos, sin [T, D]`` -> ``[T,
        H*D]``."""
        t, d = q.shape[0], cos.shape[-1]
        cos, sin = cos[:, None], sin[:, None]
        q = apply_rotary(q.view(t, -1, d), cos, sin)
        k = apply_rotary(k.reshape(t, -1, d), cos, sin)
        out = self._attend(layer, q, k, v.reshape(t, -1, d), dtype)
        return out.reshape(t, -1)

    def _attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Write ``k, v [T, Hkv, D]`` to their slots, then attend ``q [T, H, D]`` -> ``[T, H,
        D]``; each prefill (causal, after its cached prefix) as ``_prefill_fn`` says."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        meta = self.meta
        kc[meta.slots] = k.to(kc.dtype)
        vc[meta.slots] = v.to(vc.dtype)
        out = torch.empty_like(q)
        prefill = self._prefill_fn(q, kc, dtype) if meta.prefills else None  # once per layer
        for row, n, keys, mask in meta.prefills:
            out[row : row + n] = prefill(q[row : row + n], kc[keys], vc[keys], mask)
        if meta.decode_rows is not None:
            qs = q[meta.decode_rows].unsqueeze(2)  # [B, H, 1, D]
            ks = kc[meta.decode_keys].transpose(1, 2)  # [B, Hkv, ctx, D]
            vs = vc[meta.decode_keys].transpose(1, 2)
            out[meta.decode_rows] = causal_attention(qs, ks, vs, meta.decode_mask).squeeze(2)
        return out

    def _prefill_fn(self, q: torch.Tensor, kc: torch.Tensor, dtype: torch.dtype) -> PrefillFn:
        """How this layer's prefills attend: torch's SDPA."""
        return _sdpa_prefill


def _sdpa_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``q [n, H, D]`` over ``k, v [ctx, Hkv, D]`` (``mask``: causal after the prefix)."""
    qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, len, D]
    return causal_attention(qs, ks, vs, mask)[0].transpose(0, 1)


def _bf16_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """As ``_sdpa_prefill`` in ``kernels.bf16_attention``: its causal limit is the mask's (the
    queries are the last ``n`` of the ``ctx`` keys)."""
    return kernels.bf16_attention(q, k, v, [0, q.shape[0]], [0, k.shape[0]], causal=True)


class KernelPagedAttention(TorchPagedAttention):
    """An all-decode step with float32 queries and cache on the CPU in one kernel call per layer
    (rotary included); other steps as torch, except that under bf16 prefill a CPU with bf16 dot
    products runs the prefills in ``kernels.bf16_attention``."""

    def __init__(self, cache: PagedKVCache, meta: AttentionMetadata) -> None:
        super().__init__(cache, meta)
        self.all_decode = not meta.prefills

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        if not (self.all_decode and kernels.applies(q, self.cache.k[layer])):
            return super().attend(layer, q, k, v, cos, sin, dtype)
        meta = self.meta
        return kernels.decode_attention(
            q,
            k,
            v,
            cos,
            sin,
            self.cache.k[layer],
            self.cache.v[layer],
            meta.slots,
            meta.decode_keys,
            meta.decode_lens,
        )

    def _prefill_fn(self, q: torch.Tensor, kc: torch.Tensor, dtype: torch.dtype) -> PrefillFn:
        fused = dtype == torch.bfloat16 and kc.dtype == torch.float32
        if fused and kernels.bf16_attention_applies(q):
            return _bf16_prefill
        return super()._prefill_fn(q, kc, dtype)
