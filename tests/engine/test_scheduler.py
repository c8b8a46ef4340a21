"""The scheduler without a model: token budgets, chunked prefill, admission, preemption."""

from __future__ import annotations

import torch

from qwenvl.engine.block_manager import BlockManager
from qwenvl.engine.request import Request, Sequence, Status
from qwenvl.engine.scheduler import Scheduler
from qwenvl.processing.prompt import PromptInputs
from qwenvl.sampling import SamplingParams


def seq(n_prompt: int, arrival: int = 0, first_token: int = 0) -> Sequence:
    ids = list(range(first_token, first_token + n_prompt))
    prompt = PromptInputs(ids, positions=torch.arange(n_prompt).expand(3, -1))
    req = Request(f"r{arrival}", prompt, SamplingParams(max_tokens=100), [], arrival)
    s = Sequence(request=req, index=0, max_new=100, detok=None, generator=None)
    req.sequences = [s]
    return s


def advance(sched: Scheduler, out) -> None:
    """What the engine does after a step: count computed tokens, append a token on sampling."""
    for c in out.chunks:
        c.seq.num_computed = c.start + c.length
        if c.samples:
            c.seq.token_ids.append(7)


def test_chunked_prefill_under_the_token_budget():
    sched = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq(25), seq(6, 1, 100)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(c.seq, c.start, c.length) for c in out.chunks] == [(a, 0, 10)]
    assert not out.chunks[0].samples
    advance(sched, out)
    out = sched.schedule()  # a continues; b is not admitted: no budget left
    assert [(c.seq, c.start, c.length) for c in out.chunks] == [(a, 10, 10)]
    advance(sched, out)
    out = sched.schedule()  # a's last 5 tokens, then b's first 5 in the same step
    assert [(c.seq, c.start, c.length) for c in out.chunks] == [(a, 20, 5), (b, 0, 5)]
    assert out.chunks[0].samples and not out.chunks[1].samples
    advance(sched, out)
    out = sched.schedule()  # a decodes one token, b finishes its prefill
    assert [(c.seq, c.start, c.length) for c in out.chunks] == [(a, 25, 1), (b, 5, 1)]
    assert out.num_tokens == 2 and all(c.samples for c in out.chunks)


def test_max_num_seqs_and_blocks_gate_admission():
    sched = Scheduler(BlockManager(5, 4), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [seq(4, i, 10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [c.seq for c in out.chunks] == seqs[:2]  # max_num_seqs
    assert sched.waiting[0] is seqs[2]
    big = seq(20, 9, 500)  # needs 5 blocks, only 3 free: waits, nothing is allocated
    sched2 = Scheduler(BlockManager(5, 4), max_num_seqs=4, max_num_batched_tokens=100)
    sched2.add(seq(8, 0))
    sched2.add(big)
    out = sched2.schedule()
    assert len(out.chunks) == 1 and sched2.waiting[0] is big
    assert sched2.blocks.num_free_blocks == 3


def test_preemption_frees_the_newest_and_requeues_it_first():
    blocks = BlockManager(4, 4, enable_prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=100)
    a, b = seq(8, 0), seq(8, 1, 50)
    sched.add(a)
    sched.add(b)
    advance(sched, sched.schedule())  # both prefilled: 4 blocks in use, each has 9 tokens now
    assert blocks.num_free_blocks == 0
    out = sched.schedule()  # a needs a third block: b (newest) is preempted
    assert out.preempted == [b]
    assert [c.seq for c in out.chunks] == [a]
    assert b.status is Status.WAITING and b.num_computed == 0 and sched.waiting[0] is b
    assert b.token_ids == [7]  # generated tokens are kept and recomputed, not resampled
    advance(sched, out)
    sched.finish(a)
    assert blocks.num_free_blocks == 4
    out = sched.schedule()  # b comes back with prompt + its generated token to prefill
    assert [(c.seq, c.start, c.length) for c in out.chunks] == [(b, 0, 9)]
    assert out.chunks[0].samples


def test_a_lone_sequence_preempts_itself_only_when_nothing_else_can_go():
    blocks = BlockManager(2, 4, enable_prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=100)
    a = seq(8, 0)
    sched.add(a)
    advance(sched, sched.schedule())
    out = sched.schedule()
    assert out.preempted == [a] and not out.chunks
    assert blocks.num_free_blocks == 2
