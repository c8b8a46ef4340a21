"""The paged KV cache: one tensor per layer allocated once, addressed by flat slot numbers.

Slot ``b * block_size + i`` holds token ``i`` of block ``b``. The block manager decides which
blocks a sequence owns; this module holds the memory, sizes it from a budget, and builds the
per-step :class:`AttentionMetadata` that tells every layer where to write and what to read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qwenvl import kernels
from qwenvl.layers.attention import causal_attention
from qwenvl.models.qwen2_vl.config import TextConfig


def kv_bytes_per_block(cfg: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block of ``block_size`` tokens takes over all layers (keys and values)."""
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * item


def available_memory(device: torch.device) -> int:
    """Free bytes on a CUDA device, or the kernel's MemAvailable for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class PagedKVCache:
    """Keys and values of every layer as flat ``[num_blocks * block_size, kv_heads, head_dim]``."""

    def __init__(
        self,
        cfg: TextConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        slots = num_blocks * block_size
        # Zero-filled, so padded reads in batched decode see finite numbers (0 * NaN = NaN), and
        # written here, so every page is committed now: the budget is claimed at start-up instead
        # of showing up later as RSS that creeps up while requests touch new blocks.
        storage = torch.empty(
            2,
            cfg.num_hidden_layers,
            slots,
            cfg.num_key_value_heads,
            cfg.head_dim,
            dtype=dtype,
            device=device,
        )
        storage.fill_(0)
        self.k = list(storage[0].unbind(0))
        self.v = list(storage[1].unbind(0))
        self.nbytes = storage.numel() * storage.element_size()


@dataclass
class AttentionMetadata:
    """Where a step's tokens go and what each query attends to (shared by all layers).

    ``slots[t]`` is the cache slot of token ``t``. A chunk of several query tokens attends to its
    sequence's keys ``[0, ctx)`` (``prefills``: query start, query length, key slots, mask);
    single-token decode queries are batched with padded key slots and a mask.
    """

    slots: torch.Tensor  # [T] int64
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]
    decode_rows: torch.Tensor | None  # [D] int64
    decode_keys: torch.Tensor | None  # [D, max_ctx] int64
    decode_mask: torch.Tensor | None  # [D, 1, 1, max_ctx] bool
    decode_lens: torch.Tensor | None  # [D] int64: valid keys per decode row

    @classmethod
    def build(
        cls,
        chunks: Sequence[tuple[list[int], int, int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """``chunks``: (block table, first new position, number of new tokens) per sequence, in
        the order their tokens are laid out in the step."""
        slots, prefills, dec_rows, dec_keys = [], [], [], []
        row = 0
        for table, start, n in chunks:
            ctx = start + n
            blocks = torch.tensor(table, dtype=torch.long)
            pos = torch.arange(ctx)
            keys = blocks[pos // block_size] * block_size + pos % block_size
            slots.append(keys[start:])
            if n == 1:
                dec_rows.append(row)
                dec_keys.append(keys)
            else:
                mask = None
                if start:  # queries start mid-sequence: causal with an offset
                    q_pos = torch.arange(start, ctx).unsqueeze(1)
                    mask = (pos.unsqueeze(0) <= q_pos).view(1, 1, n, ctx).to(device)
                prefills.append((row, n, keys.to(device), mask))
            row += n
        decode_rows = decode_keys = decode_mask = decode_lens = None
        if dec_rows:
            decode_lens = torch.tensor([len(k) for k in dec_keys], device=device)
            width = max(len(k) for k in dec_keys)
            decode_keys = torch.zeros(len(dec_keys), width, dtype=torch.long)
            decode_mask = torch.zeros(len(dec_keys), 1, 1, width, dtype=torch.bool)
            for i, k in enumerate(dec_keys):
                decode_keys[i, : len(k)] = k
                decode_mask[i, :, :, : len(k)] = True
            decode_rows = torch.tensor(dec_rows, device=device)
            decode_keys, decode_mask = decode_keys.to(device), decode_mask.to(device)
        return cls(
            torch.cat(slots).to(device),
            prefills,
            decode_rows,
            decode_keys,
            decode_mask,
            decode_lens,
        )


class PagedContext:
    """What a decoder layer needs for one step: the cache and the step's metadata."""

    def __init__(self, cache: PagedKVCache, meta: AttentionMetadata) -> None:
        self.cache = cache
        self.meta = meta

    def fused_decode(self, q: torch.Tensor) -> bool:
        """Whether ``attend_decode`` serves this step: every token is a decode query, and the
        queries and the cache are float32 on the CPU (``kernels.applies``)."""
        meta = self.meta
        return not meta.prefills and kernels.applies(q, self.cache.k[0])

    def attend_decode(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """``attend`` for an all-decode step in one kernel call, rotary included: ``q [T,
        H*D]``, ``k, v [T, Hkv*D]`` before rotary, ``cos, sin [T, D]`` -> ``[T, H*D]``."""
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

    def decode_layers(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        params: list[torch.Tensor | None],
        num_heads: int,
        eps: float,
    ) -> None:
        """A packed decoder's layers for an all-decode step in one kernel call (``x [T, H]``
        updated in place; ``kernels.decode_layers``), attending over this cache."""
        meta = self.meta
        kernels.decode_layers(
            x,
            cos,
            sin,
            params,
            self.cache.k,
            self.cache.v,
            meta.slots,
            meta.decode_keys,
            meta.decode_lens,
            num_heads,
            eps,
        )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write ``k, v [T, Hkv, D]`` to their slots, then attend ``q [T, H, D]`` -> ``[T, H,
        D]``."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        meta = self.meta
        kc[meta.slots] = k.to(kc.dtype)
        vc[meta.slots] = v.to(vc.dtype)
        out = torch.empty_like(q)
        for row, n, keys, mask in meta.prefills:
            qs = q[row : row + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            ks = kc[keys].transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
            vs = vc[keys].transpose(0, 1).unsqueeze(0)
            out[row : row + n] = causal_attention(qs, ks, vs, mask)[0].transpose(0, 1)
        if meta.decode_rows is not None:
            qs = q[meta.decode_rows].unsqueeze(2)  # [B, H, 1, D]
            ks = kc[meta.decode_keys].transpose(1, 2)  # [B, Hkv, ctx, D]
            vs = vc[meta.decode_keys].transpose(1, 2)
            out[meta.decode_rows] = causal_attention(qs, ks, vs, meta.decode_mask).squeeze(2)
        return out
