"""Which tokens of which sequences run in the next step (continuous batching).

Every step has a token budget. Running sequences go first, in arrival order: a decoding one takes
one token, one still in prefill takes its next chunk. When the KV cache cannot hold a running
sequence's next token, the newest running sequence is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed from its prompt and the tokens it already
generated (exact, since those tokens are kept). Waiting sequences are admitted only in steps with
no preemption, while the budget, ``max_num_seqs`` and the free blocks allow; a new sequence's
whole prompt is allocated at once (minus what the prefix cache already holds), and its prefill
may then run in chunks over several steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qwenvl.engine.block_manager import BlockManager
from qwenvl.engine.request import Sequence, Status


@dataclass
class ScheduledChunk:
    """Tokens ``[start, start + length)`` of ``seq`` are computed this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the sequence's last token: its logits pick the next one."""
        return self.start + self.length == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + n, out):
                break  # seq itself was preempted
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
            i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.allocate(seq.seq_id, seq.all_ids, seq.request.spans)
            if cached is None:
                break  # not enough free blocks: wait for running sequences to finish
            self.waiting.popleft()
            seq.num_computed = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        return out

    def _reserve(self, seq: Sequence, upto: int, out: SchedulerOutput) -> bool:
        """Make ``seq``'s block table cover ``upto`` tokens, preempting the newest running
        sequences as needed; False when ``seq`` had to be preempted itself."""
        need = upto - self.blocks.num_tokens(seq.seq_id)
        while need > 0 and not self.blocks.append_slots(seq.seq_id, need):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence wherever it is and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = Status.FINISHED
