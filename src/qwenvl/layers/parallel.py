"""The pieces of a tensor-parallel decoder that talk to the other ranks (Megatron's layout).

Each rank holds a share of every decoder layer: q/k/v and gate/up split by output rows
("column-parallel": whole heads, a slice of the MLP width), o and down split by input columns
("row-parallel": each rank's product is a partial sum, added up by one all-reduce), and the
vocabulary split by rows in the embedding and the LM head. The modules stay the model's own
(``nn.Linear``, ``PackedLinear``...) built at the rank's shapes; what this file adds is attached
from outside: an all-reduce after the row-parallel layers and a gather after the head, as forward
hooks, and an embedding that looks up only its own rows. Collectives are torch.distributed's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class VocabShard:
    """Rows ``[start, end)`` of a vocabulary of ``total`` split in ``size`` pieces of ``per_rank``
    (the last may be shorter)."""

    start: int
    end: int
    per_rank: int
    total: int

    @classmethod
    def of(cls, total: int, rank: int, size: int) -> VocabShard:
        per = -(-total // size)
        start = min(total, rank * per)
        return cls(start, min(total, start + per), per, total)


def all_reduce_output(group: Any):
    """A forward hook summing a row-parallel layer's partial products over the ranks."""

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=group)
        return out

    return hook


def gather_vocab_output(shard: VocabShard, size: int, group: Any):
    """A forward hook turning a vocabulary-parallel head's ``[..., rows of this rank]`` logits
    into the whole vocabulary's on every rank."""

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        lead = out.shape[:-1]
        flat = out.reshape(-1, out.shape[-1])
        if flat.shape[1] < shard.per_rank:  # the last rank's shorter piece
            flat = nn.functional.pad(flat, (0, shard.per_rank - flat.shape[1]))
        rows = flat.shape[0]
        parts = flat.new_empty(size * rows, shard.per_rank)  # rank after rank
        dist.all_gather_single(parts, flat.contiguous(), group=group)
        full = parts.view(size, rows, shard.per_rank).permute(1, 0, 2)
        full = full.reshape(rows, size * shard.per_rank)[:, : shard.total]
        return full.reshape(*lead, shard.total)

    return hook


class VocabParallelEmbedding(nn.Module):
    """An embedding holding the rows ``[start, end)`` of the vocabulary: ids elsewhere look up
    zeros here, and the all-reduce adds the one rank that owns each id."""

    def __init__(self, shard: VocabShard, dim: int, group: Any) -> None:
        super().__init__()
        self.shard, self.group = shard, group
        self.weight = nn.Parameter(torch.empty(shard.end - shard.start, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.shard.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        dist.all_reduce(out, group=self.group)
        return out

    def extra_repr(self) -> str:
        return f"rows {self.shard.start}:{self.shard.end} of {self.shard.total}"
