"""Paged KV cache allocator with multimodal-aware prefix caching.

The KV cache is split into ``num_blocks`` fixed-size blocks of ``block_size`` token slots. Each
sequence owns a *block table* (list of block ids) mapping its token positions to slots, so memory
is allocated in small pieces instead of one max-length buffer per request.

Prefix caching: once the KV of a full block has been written, the block is registered under a
hash of its content chained to the hash of every block before it. A later request whose leading
full blocks hash identically reuses those blocks instead of recomputing them. For vision-language
models the token ids alone are not enough -- every image of the same size expands to the same run
of pad tokens -- so the hash of a block also covers the content key of every image/video whose
placeholder tokens fall into it. Identical pad ids of different images therefore never alias.

Block states (each block is in exactly one):

* free list: never hashed (or hash dropped), ready to hand out;
* evictable: ref count 0 but still registered under its hash, kept in LRU order so a later
  request can revive it; reclaimed (oldest first) when the free list runs dry;
* referenced: ref count > 0, i.e. held by at least one block table; never handed out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

__all__ = ["BlockManager", "MMSpan", "block_hashes"]


@dataclass(frozen=True)
class MMSpan:
    """One image/video's placeholder tokens inside a sequence.

    ``key`` must identify the item's content *and* preprocessing options (resize bounds, fps, ...),
    because both determine the vision embeddings written into the KV cache.
    """

    start: int  # index of its first placeholder token in the token list
    length: int  # number of placeholder tokens
    key: str  # content hash (+ preprocessing options) of the item


def _span_extras(spans: Sequence[MMSpan], lo: int, hi: int) -> tuple[tuple[str, int, int], ...]:
    """Spans overlapping tokens ``[lo, hi)`` as ``(key, offset into span, offset into block)``.

    The offset into the span tells which part of the item's embeddings the block holds; the offset
    into the block pins where it sits (cheap extra safety when pad ids are indistinguishable).
    """
    out = []
    for span in spans:
        end = span.start + span.length
        if span.length > 0 and span.start < hi and end > lo:
            first = max(lo, span.start)
            out.append((span.key, first - span.start, first - lo))
    out.sort(key=lambda e: e[2])
    return tuple(out)


def _hash_block(parent: int | None, tokens: Sequence[int], extras: tuple) -> int:
    """Stable 64-bit hash of one block (Python's ``hash`` is salted per process for ``str``)."""
    payload = repr((parent, tuple(int(t) for t in tokens), extras)).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    spans: Sequence[MMSpan] = (),
    parent: int | None = None,
) -> list[int]:
    """One chained hash per FULL block of ``token_ids`` (a trailing partial block gets none).

    Block ``i``'s hash covers the previous block's hash (``parent`` for block 0), its token ids and
    the keys of the multimodal spans overlapping it, so two blocks hash equal only if the whole
    prefix up to and including them is identical -- which is what makes their KV interchangeable.
    Deterministic across processes and machines.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    out: list[int] = []
    prev = parent
    for i in range(len(token_ids) // block_size):
        lo, hi = i * block_size, (i + 1) * block_size
        prev = _hash_block(prev, token_ids[lo:hi], _span_extras(spans, lo, hi))
        out.append(prev)
    return out


class BlockManager:
    """Hands out KV cache blocks to sequences and shares identical prefix blocks between them."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks: int = num_blocks
        self.block_size: int = block_size
        self.enable_prefix_caching: bool = enable_prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest-freed first
        self._ref: list[int] = [0] * num_blocks
        self._block_hash: dict[int, int] = {}  # block -> hash, only for blocks owning a map entry
        self._hash_to_block: dict[int, int] = {}
        self._tables: dict[Hashable, list[int]] = {}
        self._num_tokens: dict[Hashable, int] = {}
        self._seq_hashes: dict[Hashable, list[int]] = {}  # chain hashes of computed full blocks
        self.stats: dict[str, int] = {"prefix_queries": 0, "prefix_hits": 0, "evictions": 0}

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: the free list plus evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks required to hold ``num_tokens`` tokens (ceil division)."""
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: Hashable) -> list[int]:
        """Copy of the sequence's block table (a copy, so callers cannot corrupt our state)."""
        return list(self._tables[seq_id])

    def num_tokens(self, seq_id: Hashable) -> int:
        """Number of token positions the sequence's block table covers."""
        return self._num_tokens[seq_id]

    def slot(self, seq_id: Hashable, position: int) -> int:
        """Flat KV cache slot of token ``position``: where the attention kernel writes/reads it."""
        if not 0 <= position < self._num_tokens[seq_id]:
            raise IndexError(f"position {position} outside the {self._num_tokens[seq_id]} covered")
        return self._tables[seq_id][position // self.block_size] * self.block_size + (
            position % self.block_size
        )

    # ------------------------------------------------------------------ allocation

    def _take_block(self) -> int:
        """Pop a block for exclusive use: free list first, else evict the LRU cached block."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._hash_to_block[self._block_hash.pop(block)]
            self.stats["evictions"] += 1
        self._ref[block] = 1
        return block

    def _cached_prefix(
        self, token_ids: Sequence[int], spans: Sequence[MMSpan]
    ) -> tuple[list[int], list[int], int]:
        """(blocks, hashes, blocks queried) of the longest cached chain of leading full blocks.

        Capped at ``(len(token_ids) - 1) // block_size`` blocks: the last prompt token must be
        run through the model to produce the logits of the next token.
        """
        max_blocks = max(0, (len(token_ids) - 1) // self.block_size)
        blocks: list[int] = []
        hashes: list[int] = []
        prev: int | None = None
        bs = self.block_size
        for i in range(max_blocks):
            lo, hi = i * bs, (i + 1) * bs
            prev = _hash_block(prev, token_ids[lo:hi], _span_extras(spans, lo, hi))
            block = self._hash_to_block.get(prev)
            if block is None:
                break
            blocks.append(block)
            hashes.append(prev)
        return blocks, hashes, max_blocks

    def allocate(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int],
        spans: Sequence[MMSpan] = (),
        num_tokens: int | None = None,
    ) -> int | None:
        """Create ``seq_id``'s block table covering ``num_tokens`` (default all) tokens.

        With prefix caching, the longest chain of cached leading full blocks is reused (the table
        then covers ``max(num_tokens, cached tokens)``). Returns the number of tokens served from
        the cache (a multiple of ``block_size``), or ``None`` -- with no state change at all -- when
        there are not enough free blocks, so the scheduler can simply retry later.
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has a block table")
        if num_tokens is None:
            num_tokens = len(token_ids)
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")

        if self.enable_prefix_caching:
            hit_blocks, hit_hashes, queried = self._cached_prefix(token_ids, spans)
        else:
            hit_blocks, hit_hashes, queried = [], [], 0
        cached_tokens = len(hit_blocks) * self.block_size
        covered = max(num_tokens, cached_tokens)
        num_new = self.blocks_needed(covered) - len(hit_blocks)
        revived = sum(1 for b in hit_blocks if self._ref[b] == 0)
        if num_new > self.num_free_blocks - revived:
            return None

        for block in hit_blocks:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
        table = hit_blocks + [self._take_block() for _ in range(num_new)]
        self._tables[seq_id] = table
        self._num_tokens[seq_id] = covered
        self._seq_hashes[seq_id] = hit_hashes
        self.stats["prefix_queries"] += queried
        self.stats["prefix_hits"] += len(hit_blocks)
        return cached_tokens

    def append_slots(self, seq_id: Hashable, num_new_tokens: int) -> bool:
        """Grow the table to cover ``num_new_tokens`` more tokens; False (no change) if short."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        table = self._tables[seq_id]
        total = self._num_tokens[seq_id] + num_new_tokens
        num_new = self.blocks_needed(total) - len(table)
        if num_new > self.num_free_blocks:
            return False
        table.extend(self._take_block() for _ in range(num_new))
        self._num_tokens[seq_id] = total
        return True

    def mark_computed(
        self, seq_id: Hashable, token_ids: Sequence[int], spans: Sequence[MMSpan] = ()
    ) -> None:
        """Register newly full blocks once the KV of the first ``len(token_ids)`` tokens is written.

        Only written blocks may be registered, or a concurrent request could read garbage KV. If a
        different block already holds the same hash, the map keeps pointing at it (our block then
        stays private and returns to the free list when freed).
        """
        if len(token_ids) > self._num_tokens[seq_id]:
            raise ValueError(
                f"{len(token_ids)} computed tokens but the table covers {self._num_tokens[seq_id]}"
            )
        if not self.enable_prefix_caching:
            return
        table = self._tables[seq_id]
        hashes = self._seq_hashes[seq_id]
        bs = self.block_size
        for i in range(len(hashes), len(token_ids) // bs):
            lo, hi = i * bs, (i + 1) * bs
            parent = hashes[-1] if hashes else None
            h = _hash_block(parent, token_ids[lo:hi], _span_extras(spans, lo, hi))
            hashes.append(h)
            block = table[i]
            if h not in self._hash_to_block and block not in self._block_hash:
                self._hash_to_block[h] = block
                self._block_hash[block] = h

    # ------------------------------------------------------------------ release

    def free(self, seq_id: Hashable) -> None:
        """Release the sequence's blocks; hashed blocks stay cached (evictable), others are freed.

        Blocks are released tail first, so a sequence's later blocks are evicted before its earlier
        ones: evicting a head block would orphan every cached block chained after it.
        """
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        del self._num_tokens[seq_id]
        del self._seq_hashes[seq_id]
        for block in reversed(table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._block_hash:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ------------------------------------------------------------------ debugging

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the bookkeeping is inconsistent (for tests and debugging).

        Uses explicit raises, not ``assert``, so it still checks under ``python -O``.
        """

        def require(cond: bool, msg: str) -> None:
            if not cond:
                raise AssertionError(msg)

        free = list(self._free)
        require(len(free) == len(set(free)), "duplicate block in the free list")
        free_set, evictable = set(free), set(self._evictable)
        holders = [0] * self.num_blocks
        for seq_id, table in self._tables.items():
            require(len(table) == len(set(table)), f"block repeated in table of {seq_id!r}")
            covered = self._num_tokens[seq_id]
            require(
                len(table) == self.blocks_needed(covered),
                f"table of {seq_id!r} has {len(table)} blocks for {covered} tokens",
            )
            require(
                len(self._seq_hashes[seq_id]) <= covered // self.block_size,
                f"{seq_id!r} has hashes for more blocks than it covers",
            )
            for block in table:
                require(0 <= block < self.num_blocks, f"bad block id {block}")
                holders[block] += 1
        require(
            self._tables.keys() == self._num_tokens.keys() == self._seq_hashes.keys(),
            "per-sequence maps disagree",
        )
        for block in range(self.num_blocks):
            ref = self._ref[block]
            require(ref == holders[block], f"block {block}: ref {ref} but {holders[block]} tables")
            states = (block in free_set) + (block in evictable) + (ref > 0)
            require(states == 1, f"block {block} is in {states} states (free/evictable/referenced)")
            if block in free_set:
                require(block not in self._block_hash, f"free block {block} still has a hash")
            if block in evictable:
                require(block in self._block_hash, f"evictable block {block} has no hash")
        require(len(self._block_hash) == len(self._hash_to_block), "hash maps differ in size")
        for block, h in self._block_hash.items():
            require(self._hash_to_block.get(h) == block, f"hash maps disagree on block {block}")
