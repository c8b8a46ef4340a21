"""Tests for qwenvl/engine/block_manager.py against hand-computed block tables and cache hits."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl.engine.block_manager import BlockManager, MMSpan, block_hashes

BS = 4
PAD = 9  # every image expands to this same placeholder id: only the span key tells them apart


def _ref(mgr: BlockManager, block: int) -> int:
    return mgr._ref[block]


# ---------------------------------------------------------------------------- basic allocation


def test_blocks_needed() -> None:
    mgr = BlockManager(8, BS)
    assert [mgr.blocks_needed(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_allocate_block_table_and_slots() -> None:
    mgr = BlockManager(10, BS)
    assert mgr.allocate("a", list(range(10))) == 0
    assert mgr.block_table("a") == [0, 1, 2]
    assert mgr.num_tokens("a") == 10
    assert mgr.num_free_blocks == 7
    assert mgr.allocate("b", [100, 101, 102]) == 0
    assert mgr.block_table("b") == [3]
    assert mgr.slot("a", 0) == 0
    assert mgr.slot("a", 5) == 1 * BS + 1
    assert mgr.slot("a", 9) == 2 * BS + 1
    assert mgr.slot("b", 2) == 3 * BS + 2
    with pytest.raises(IndexError):
        mgr.slot("b", 3)
    # num_tokens overrides the length (e.g. reserving room up front)
    assert mgr.allocate("c", [1, 2], num_tokens=5) == 0
    assert mgr.block_table("c") == [4, 5]
    assert mgr.num_tokens("c") == 5
    mgr.check_invariants()


def test_allocate_twice_raises_and_free_unknown_is_noop() -> None:
    mgr = BlockManager(4, BS)
    mgr.allocate("a", [1, 2, 3])
    with pytest.raises(ValueError):
        mgr.allocate("a", [1, 2, 3])
    mgr.free("nope")
    mgr.free("a")
    mgr.free("a")
    assert mgr.num_free_blocks == 4
    mgr.check_invariants()


def test_allocate_all_or_nothing() -> None:
    mgr = BlockManager(3, BS)
    assert mgr.allocate("a", [1] * 5) == 0  # blocks 0, 1
    stats = dict(mgr.stats)
    assert mgr.allocate("b", [2] * 9) is None  # needs 3, only 1 free
    assert mgr.num_free_blocks == 1
    assert mgr.stats == stats
    with pytest.raises(KeyError):
        mgr.block_table("b")
    mgr.check_invariants()
    assert mgr.allocate("b", [2] * 4) == 0
    assert mgr.block_table("b") == [2]
    assert mgr.num_free_blocks == 0
    assert mgr.allocate("c", [3]) is None
    mgr.check_invariants()


def test_append_slots_grows_and_fails_cleanly() -> None:
    mgr = BlockManager(3, BS)
    mgr.allocate("a", [1, 2, 3])
    assert mgr.block_table("a") == [0]
    assert mgr.append_slots("a", 1) and mgr.block_table("a") == [0] and mgr.num_tokens("a") == 4
    assert mgr.append_slots("a", 1) and mgr.block_table("a") == [0, 1]
    assert not mgr.append_slots("a", 8)  # 13 tokens -> 4 blocks, only 1 left
    assert mgr.block_table("a") == [0, 1] and mgr.num_tokens("a") == 5
    assert mgr.num_free_blocks == 1
    assert mgr.append_slots("a", 3) and mgr.block_table("a") == [0, 1]  # exactly 8
    assert mgr.append_slots("a", 4) and mgr.block_table("a") == [0, 1, 2]
    assert mgr.num_free_blocks == 0
    assert mgr.append_slots("a", 0)
    mgr.check_invariants()


def test_free_returns_every_block() -> None:
    mgr = BlockManager(10, BS)
    mgr.allocate("a", list(range(9)))
    mgr.allocate("b", list(range(9)))
    mgr.mark_computed("a", list(range(9)))
    mgr.allocate("c", list(range(9)))  # hits a's first block
    mgr.append_slots("c", 7)
    mgr.check_invariants()
    for seq in ("a", "b", "c"):
        mgr.free(seq)
        mgr.check_invariants()
    assert mgr.num_free_blocks == 10


# ---------------------------------------------------------------------------- prefix caching


def test_prefix_hit_for_identical_tokens() -> None:
    mgr = BlockManager(10, BS)
    toks = list(range(10))
    assert mgr.allocate("a", toks) == 0
    mgr.mark_computed("a", toks)
    assert mgr.allocate("b", toks) == 8
    assert mgr.block_table("a") == [0, 1, 2]
    assert mgr.block_table("b") == [0, 1, 3]
    assert [_ref(mgr, b) for b in range(4)] == [2, 2, 1, 1]
    # both lookups query (10 - 1) // 4 = 2 blocks; only the second hits
    assert mgr.stats == {"prefix_queries": 4, "prefix_hits": 2, "evictions": 0}
    mgr.check_invariants()
    mgr.free("a")  # shared blocks stay with b, a's private tail (unhashed) is freed
    assert [_ref(mgr, b) for b in range(4)] == [1, 1, 0, 1]
    assert mgr.num_free_blocks == 7
    mgr.check_invariants()


def test_last_token_is_never_served_from_cache() -> None:
    mgr = BlockManager(10, BS)
    toks = list(range(8))  # exactly 2 full blocks
    mgr.allocate("a", toks)
    mgr.mark_computed("a", toks)
    assert mgr.allocate("b", toks) == 4  # only block 0: token 7 must be computed for logits
    assert mgr.block_table("b") == [0, 2]
    assert mgr.stats["prefix_queries"] == 1 + 1
    assert mgr.stats["prefix_hits"] == 1
    assert mgr.allocate("c", toks + [99]) == 8  # one more token: both blocks may be reused
    assert mgr.block_table("c") == [0, 1, 3]
    mgr.check_invariants()


def test_single_block_prompt_never_hits() -> None:
    mgr = BlockManager(4, BS)
    mgr.allocate("a", [1, 2, 3, 4])
    mgr.mark_computed("a", [1, 2, 3, 4])
    assert mgr.allocate("b", [1, 2, 3, 4]) == 0
    assert mgr.allocate("c", []) == 0 and mgr.block_table("c") == []
    mgr.check_invariants()


def test_no_prefix_caching() -> None:
    mgr = BlockManager(6, BS, enable_prefix_caching=False)
    toks = list(range(9))
    assert mgr.allocate("a", toks) == 0
    mgr.mark_computed("a", toks)
    assert mgr.allocate("b", toks) == 0
    assert mgr.block_table("b") == [3, 4, 5]
    assert mgr.stats == {"prefix_queries": 0, "prefix_hits": 0, "evictions": 0}
    mgr.free("a")
    mgr.free("b")
    assert mgr.num_free_blocks == 6 and not mgr._evictable
    mgr.check_invariants()


# The image (span 2..5) crosses the boundary between blocks 0 and 1.
MM_TOKS = [1, 2, PAD, PAD, PAD, PAD, 3, 4, 5]


def test_different_span_keys_share_no_blocks() -> None:
    mgr = BlockManager(10, BS)
    mgr.allocate("a", MM_TOKS, [MMSpan(2, 4, "img-A")])
    mgr.mark_computed("a", MM_TOKS, [MMSpan(2, 4, "img-A")])
    assert mgr.allocate("b", MM_TOKS, [MMSpan(2, 4, "img-B")]) == 0
    assert not set(mgr.block_table("a")) & set(mgr.block_table("b"))
    assert mgr.allocate("c", MM_TOKS) == 0  # no span at all: also different
    assert not set(mgr.block_table("a")) & set(mgr.block_table("c"))
    assert mgr.stats["prefix_hits"] == 0
    mgr.check_invariants()


def test_same_span_key_shares_blocks() -> None:
    mgr = BlockManager(10, BS)
    span = [MMSpan(2, 4, "img-A")]
    mgr.allocate("a", MM_TOKS, span)
    mgr.mark_computed("a", MM_TOKS, span)
    assert mgr.allocate("b", MM_TOKS, [MMSpan(2, 4, "img-A")]) == 8
    assert mgr.block_table("b")[:2] == mgr.block_table("a")[:2] == [0, 1]
    mgr.check_invariants()


def test_span_crossing_boundary_changes_both_blocks() -> None:
    toks = MM_TOKS + [6, 7, 8]  # 3 full blocks
    a = block_hashes(toks, BS, [MMSpan(2, 4, "img-A")])
    b = block_hashes(toks, BS, [MMSpan(2, 4, "img-B")])
    assert len(a) == len(b) == 3
    assert all(x != y for x, y in zip(a, b))
    # a span only in block 1 leaves block 0 alone
    c = block_hashes(toks, BS, [MMSpan(4, 2, "img-A")])
    d = block_hashes(toks, BS, [MMSpan(4, 2, "img-B")])
    assert c[0] == d[0] and c[1] != d[1] and c[2] != d[2]
    # a span in the (partial) tail does not touch the full blocks
    plain = block_hashes(toks, BS)
    assert block_hashes(toks + [PAD], BS, [MMSpan(12, 1, "img-A")]) == plain
    # the same key at a different offset into the item (two images, same id) differs
    e = block_hashes([PAD] * 8, BS, [MMSpan(0, 8, "img-A")])
    f = block_hashes([PAD] * 8, BS, [MMSpan(0, 4, "img-A"), MMSpan(4, 4, "img-A")])
    assert e[0] == f[0] and e[1] != f[1]


def test_hash_chaining() -> None:
    toks = list(range(12))
    base = block_hashes(toks, BS)
    assert len(base) == 3 and len(set(base)) == 3
    changed0 = block_hashes([99] + toks[1:], BS)
    assert all(x != y for x, y in zip(base, changed0))
    changed5 = block_hashes(toks[:5] + [99] + toks[6:], BS)
    assert changed5[0] == base[0] and changed5[1] != base[1] and changed5[2] != base[2]
    # only full blocks are hashed; parent continues a chain
    assert block_hashes(toks[:11], BS) == base[:2]
    assert block_hashes(toks[4:], BS, parent=base[0]) == base[1:]
    assert block_hashes(toks[4:], BS) != base[1:]
    # identical block contents at different chain positions hash differently
    assert len(set(block_hashes([7] * 12, BS))) == 3


def test_block_hashes_deterministic_across_processes() -> None:
    toks = MM_TOKS + [6, 7, 8]
    spans = [MMSpan(2, 4, "img-A|max_pixels=1024")]
    expected = block_hashes(toks, BS, spans)
    assert all(isinstance(h, int) and 0 <= h < 2**64 for h in expected)
    assert block_hashes(toks, BS, spans) == expected
    path = Path(__file__).parents[2] / "src" / "qwenvl" / "engine" / "block_manager.py"
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('bm', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['bm'] = m\n"
        "spec.loader.exec_module(m)\n"
        f"print(json.dumps(m.block_hashes({toks!r}, {BS}, [m.MMSpan(2, 4, {spans[0].key!r})])))\n"
    )
    for seed in ("1", "2"):  # str hashing is salted per process; ours must not be
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == expected


def test_lru_eviction_order() -> None:
    mgr = BlockManager(6, BS)
    a_toks, b_toks = [1, 1, 1, 1, 1], [2, 2, 2, 2, 2]
    mgr.allocate("a", a_toks)  # [0, 1]
    mgr.allocate("b", b_toks)  # [2, 3]
    mgr.mark_computed("a", a_toks)
    mgr.mark_computed("b", b_toks)
    mgr.free("a")  # block 0 cached first -> least recently freed
    mgr.free("b")  # block 2 cached
    assert mgr.num_free_blocks == 6
    mgr.check_invariants()
    mgr.allocate("c", list(range(100, 116)))  # 4 blocks: uses the free list (4, 5, 1, 3)
    assert mgr.block_table("c") == [4, 5, 1, 3]
    assert mgr.stats["evictions"] == 0
    mgr.allocate("x", [7, 7, 7])  # free list empty: evicts a's block 0, not b's block 2
    assert mgr.block_table("x") == [0]
    assert mgr.stats["evictions"] == 1
    mgr.check_invariants()
    mgr.free("x")
    mgr.free("c")
    assert mgr.allocate("d", a_toks) == 0
    assert mgr.allocate("e", b_toks) == 4
    assert mgr.block_table("e")[0] == 2
    mgr.check_invariants()


def test_free_releases_tail_first() -> None:
    mgr = BlockManager(3, BS)
    toks = list(range(9))
    mgr.allocate("a", toks)  # [0, 1, 2]
    mgr.mark_computed("a", toks)  # blocks 0 and 1 hashed, 2 partial
    mgr.free("a")  # evictable order: 1 then 0 -> the chain head outlives its tail
    mgr.allocate("x", [50] * 8)  # block 2 from the free list, then evicts 1
    assert mgr.block_table("x") == [2, 1]
    mgr.free("x")
    assert mgr.allocate("a2", toks) == 4  # head block 0 still cached
    assert mgr.block_table("a2")[0] == 0
    mgr.check_invariants()


def test_revival_of_evictable_block() -> None:
    mgr = BlockManager(4, BS)
    toks = [1, 2, 3, 4, 5]
    mgr.allocate("a", toks)  # [0, 1]
    mgr.mark_computed("a", toks)
    mgr.free("a")
    assert mgr.num_free_blocks == 4 and _ref(mgr, 0) == 0
    assert mgr.allocate("b", toks) == 4
    assert mgr.block_table("b") == [0, 2]
    assert _ref(mgr, 0) == 1 and 0 not in mgr._evictable
    assert mgr.num_free_blocks == 2
    assert mgr.stats["evictions"] == 0
    mgr.check_invariants()


def test_revival_is_all_or_nothing() -> None:
    mgr = BlockManager(2, BS)
    toks = [1, 2, 3, 4, 5]
    mgr.allocate("a", toks)
    mgr.mark_computed("a", toks)
    mgr.free("a")  # free list [1], evictable [0]
    stats = dict(mgr.stats)
    # 13 tokens: 1 hit + 3 new, but reviving block 0 leaves only 1 free block
    assert mgr.allocate("b", toks + [6] * 8) is None
    assert mgr.stats == stats and mgr.num_free_blocks == 2 and 0 in mgr._evictable
    mgr.check_invariants()
    assert mgr.allocate("c", toks) == 4
    mgr.check_invariants()


def test_duplicate_hash_keeps_existing_entry() -> None:
    mgr = BlockManager(6, BS)
    toks = [1, 2, 3, 4, 5]
    mgr.allocate("a", toks)  # [0, 1]
    mgr.allocate("b", toks)  # [2, 3]: nothing computed yet, so no hit
    mgr.mark_computed("a", toks)
    mgr.mark_computed("b", toks)  # same hash as block 0: map keeps pointing at 0
    assert mgr.block_table("b") == [2, 3]
    mgr.check_invariants()
    mgr.free("b")  # block 2 owns no hash entry -> plain free list
    assert 2 in mgr._free and 2 not in mgr._evictable
    assert mgr.allocate("c", toks) == 4
    assert mgr.block_table("c")[0] == 0
    mgr.check_invariants()


def test_mark_computed_incremental_and_bounds() -> None:
    mgr = BlockManager(8, BS)
    toks = list(range(13))
    mgr.allocate("a", toks[:6])
    mgr.mark_computed("a", toks[:6])  # block 0 registered
    with pytest.raises(ValueError):
        mgr.mark_computed("a", toks[:7])  # beyond the table
    mgr.append_slots("a", 7)
    mgr.mark_computed("a", toks)  # blocks 1 and 2, chained onto block 0's hash
    assert mgr.allocate("b", toks + [0]) == 12
    assert mgr.block_table("b")[:3] == mgr.block_table("a")[:3]
    mgr.check_invariants()


def test_check_invariants_detects_corruption() -> None:
    mgr = BlockManager(4, BS)
    mgr.allocate("a", [1, 2, 3, 4, 5])
    mgr.check_invariants()
    mgr._ref[0] += 1
    with pytest.raises(AssertionError):
        mgr.check_invariants()
    mgr._ref[0] -= 1
    mgr._free.append(1)  # a referenced block also on the free list
    with pytest.raises(AssertionError):
        mgr.check_invariants()
    mgr._free.pop()
    mgr.check_invariants()


# ---------------------------------------------------------------------------- randomized


def _random_prompt(rng: random.Random) -> tuple[list[int], list[MMSpan]]:
    """Text from a 3-token vocab and images whose placeholders are all ``PAD``."""
    toks: list[int] = []
    spans: list[MMSpan] = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.4:
            key = rng.choice(["img-a", "img-b", "img-c"])
            length = 3 if key == "img-a" else 5
            spans.append(MMSpan(len(toks), length, key))
            toks += [PAD] * length
        else:
            toks += [rng.randint(1, 3) for _ in range(rng.randint(1, 5))]
    return toks, spans


def _true_kv(toks: list[int], spans: list[MMSpan]) -> list[tuple]:
    """What a model would write at each position: a function of the whole (rich) prefix."""
    rich = [(t, None, 0) for t in toks]
    for s in spans:
        for j in range(s.length):
            rich[s.start + j] = (PAD, s.key, j)
    return [tuple(rich[: p + 1]) for p in range(len(rich))]


@pytest.mark.parametrize("seed", range(6))
def test_random_stress(seed: int) -> None:
    rng = random.Random(seed)
    mgr = BlockManager(rng.randint(4, 24), BS)
    kv: dict[int, tuple] = {}  # simulated KV cache: slot -> content
    seqs: dict[int, dict] = {}  # seq_id -> {"toks", "spans", "computed"}
    next_id = 0
    hits = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.35 or not seqs:
            toks, spans = _random_prompt(rng)
            sid, next_id = next_id, next_id + 1
            free_before = mgr.num_free_blocks
            cached = mgr.allocate(sid, toks, spans)
            if cached is None:
                assert mgr.num_free_blocks == free_before
                assert sid not in mgr._tables
            else:
                assert cached % BS == 0 and cached <= max(0, len(toks) - 1)
                hits += cached > 0
                truth = _true_kv(toks, spans)
                for p in range(cached):  # every cache hit holds exactly the right KV
                    assert kv[mgr.slot(sid, p)] == truth[p]
                seqs[sid] = {"toks": toks, "spans": spans, "computed": cached}
        elif op < 0.6:
            sid = rng.choice(list(seqs))
            s = seqs[sid]
            n = rng.randint(0, 6)
            before = mgr.block_table(sid)
            if mgr.append_slots(sid, n):
                s["toks"] = s["toks"] + [rng.randint(1, 3) for _ in range(n)]
                assert mgr.num_tokens(sid) == len(s["toks"])
            else:
                assert mgr.block_table(sid) == before
        elif op < 0.85:
            sid = rng.choice(list(seqs))
            s = seqs[sid]
            k = rng.randint(s["computed"], len(s["toks"]))
            truth = _true_kv(s["toks"], s["spans"])
            others = {b for o in seqs if o != sid for b in mgr.block_table(o)}
            for p in range(s["computed"], k):  # "run the model": write KV, never into shared
                assert mgr.block_table(sid)[p // BS] not in others
                kv[mgr.slot(sid, p)] = truth[p]
            mgr.mark_computed(sid, s["toks"][:k], s["spans"])
            s["computed"] = k
        else:
            sid = rng.choice(list(seqs))
            mgr.free(sid)
            del seqs[sid]
        mgr.check_invariants()
    for sid in list(seqs):
        mgr.free(sid)
        mgr.check_invariants()
    assert mgr.num_free_blocks == mgr.num_blocks
    assert mgr.stats["prefix_hits"] >= hits
