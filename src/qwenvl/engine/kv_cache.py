"""The paged KV cache: one tensor per layer allocated once, addressed by flat slot numbers.

Slot ``b * block_size + i`` holds token ``i`` of block ``b``. The block manager decides which
blocks a sequence owns; this module holds the memory, sizes it from a budget, and builds the
per-step :class:`AttentionMetadata` that tells every layer where to write and what to read.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qwenvl.engine.config import EngineConfig
from qwenvl.errors import ConfigError
from qwenvl.models import KVShape


def kv_bytes_per_block(shape: KVShape, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block of ``block_size`` tokens takes over all layers (keys and values)."""
    return block_size * shape.bytes_per_token(dtype)


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


def kv_blocks_for(
    config: EngineConfig, max_model_len: int, per_block: int, device: torch.device, sharing: int = 1
) -> int:
    """How many KV blocks to allocate: ``config.kv_cache_memory`` or the measured share of free
    memory, split ``sharing`` ways (tensor-parallel ranks on one machine's RAM: the budget is
    the machine's, as at size 1), never more than ``max_num_seqs`` full contexts need."""
    budget = config.kv_cache_memory
    if budget is None:
        budget = int(available_memory(device) * config.memory_fraction)
    budget //= sharing
    enough = config.max_num_seqs * math.ceil(max_model_len / config.block_size)
    blocks = min(budget // per_block, enough)
    if blocks < 1:
        raise ConfigError(
            f"the KV cache budget of {budget} bytes holds no block of {config.block_size} tokens "
            f"({per_block} bytes each)"
        )
    return blocks


def _zeroed(size: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor; on the CPU, pages of an anonymous mapping (zero until first written)."""
    nbytes = math.prod(size) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes == 0:
        return torch.zeros(size, dtype=dtype, device=device)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype).view(size)  # keeps ``pages`` alive


class PagedKVCache:
    """Keys and values of every layer as flat ``[num_blocks * block_size, kv_heads, head_dim]``."""

    def __init__(
        self,
        shape: KVShape,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        slots = num_blocks * block_size
        # Zeroed, so padded reads in batched decode see finite numbers (0 * NaN = NaN). On the
        # CPU the storage is an anonymous mapping, which the kernel hands out zeroed page by page
        # on first touch: start-up does not write gigabytes of zeros (seconds on a 2-core box),
        # and RSS grows as requests reach new blocks (admission already counts blocks).
        size = (2, shape.num_layers, slots, shape.num_kv_heads, shape.head_dim)
        storage = _zeroed(size, dtype, device)
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
