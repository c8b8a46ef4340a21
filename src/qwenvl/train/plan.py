"""Which units each optimizer step trains on, and which part of a step each rank takes.

Epoch ``e`` visits the units in ``randperm(seed * 1000 + e)`` order; with packing, rows are
first-fit packed from the index lengths in that order. A step is ``micro_per_step`` micro-batches
of ``rows_per_micro`` rows: the global batch, the same for any number of ranks. Everything is a
pure function of (seed, epoch, step), so a checkpoint needs only the step number, and a run
resumed on another number of ranks sees the same samples in the same steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwenvl.train.packing import pack

MicroBatch = list[list[int]]  # rows -> unit indices
Step = list[MicroBatch]


class StepPlan:
    """Steps -> micro-batches -> rows -> unit indices, over as many epochs as asked for."""

    def __init__(
        self,
        lengths: Sequence[int],
        seed: int,
        rows_per_micro: int,
        micro_per_step: int,
        pack_budget: int | None = None,
    ) -> None:
        self.lengths, self.seed, self.pack = lengths, seed, pack_budget
        self.rows_per_micro, self.micro_per_step = rows_per_micro, micro_per_step
        self._epochs: dict[int, list[Step]] = {}
        self._counts: list[int] = []

    def epoch(self, e: int) -> list[Step]:
        """The steps of epoch ``e`` (the two newest epochs are kept)."""
        if e not in self._epochs:
            g = torch.Generator().manual_seed(self.seed * 1000 + e)
            order = torch.randperm(len(self.lengths), generator=g).tolist()
            rows = pack(self.lengths, self.pack, order) if self.pack else [[i] for i in order]
            b, m = self.rows_per_micro, self.micro_per_step
            mbs = [rows[i : i + b] for i in range(0, len(rows), b)]
            self._epochs[e] = [mbs[i : i + m] for i in range(0, len(mbs), m)]
            for old in [k for k in self._epochs if k != e][:-1]:  # keep e and the last other
                del self._epochs[old]
        return self._epochs[e]

    def steps_in(self, e: int) -> int:
        while len(self._counts) <= e:
            self._counts.append(len(self.epoch(len(self._counts))))
        return self._counts[e]

    def steps_in_epochs(self, epochs: int) -> int:
        return sum(self.steps_in(e) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """Global step -> (epoch, step within the epoch)."""
        e = 0
        while step >= self.steps_in(e):
            step -= self.steps_in(e)
            e += 1
        return e, step

    def step(self, step: int) -> Step:
        e, k = self.locate(step)
        return self.epoch(e)[k]

    def share(self, step: int, rank: int, world: int) -> tuple[Step, int, MicroBatch]:
        """Rank ``rank``'s consecutive run of the step's micro-batches, how many padding passes
        it adds so that every rank makes as many, and a micro-batch to pad with if it has none."""
        return rank_share(self.step(step), rank, world)

    def num_rows(self, step: int) -> int:
        return sum(len(mb) for mb in self.step(step))


def rank_share(mbs: list[MicroBatch], rank: int, world: int) -> tuple[Step, int, MicroBatch]:
    """Rank ``rank``'s consecutive run of ``mbs``, the padding passes that give it as many as
    every other rank, and a micro-batch to pad with if it has none."""
    per = -(-len(mbs) // world)
    mine = mbs[rank * per : (rank + 1) * per]
    return mine, per - len(mine), mbs[0]
