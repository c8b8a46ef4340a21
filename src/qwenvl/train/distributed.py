"""Data-parallel (DDP) and fully sharded (FSDP2) training under ``torchrun``.

``torchrun --nproc-per-node N -m qwenvl train ...`` sets ``RANK``/``WORLD_SIZE``; each rank then
joins the group (NCCL on GPUs, gloo on CPUs), takes its own GPU, and trains on its share of every
step's global batch. By default the model is replicated and gradients are all-reduced
(``DistributedDataParallel``); ``--fsdp`` shards parameters, gradients and optimizer state over
the ranks (``fully_shard``: one unit per decoder layer, the rest in the root unit, bf16 compute
over fp32 shards on GPUs). Multi-node is torchrun's ``--nnodes``/``--rdzv-endpoint``.

Every rank must run the same collectives in every pass. A rank whose micro-batch has no picture
does not run the vision tower, so :class:`TrainModule` touches the tower's trainable weights with
a zero: their gradients exist (zeros) on every rank, and the reductions match.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process among the training ranks (``group`` False: a single process, no group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    group: bool = False  # a torchrun job, even of one process (FSDP on one GPU shards nothing
    # but casts through its mixed-precision policy, with the same code as on many)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.group


def join(device: str) -> tuple[Ranks, torch.device]:
    """Join torchrun's group (any ``WORLD_SIZE``, 1 included, when torchrun's rendezvous
    variables are set); returns the ranks and this rank's device (``device`` "auto":
    cuda:<local rank> when CUDA is there, else the CPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if size <= 1 and not {"MASTER_ADDR", "MASTER_PORT", "RANK"} <= set(os.environ):
        return Ranks(), dev
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), local,
                  int(os.environ.get("LOCAL_WORLD_SIZE", "1")), group=True)  # fmt: skip
    if dev.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        torch.set_num_threads(max(1, cores // ranks.local_size))  # ranks share the cores
    return ranks, dev


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Element-wise sum over the ranks (float64, so counts stay exact)."""
    if not ranks.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any, ranks: Ranks) -> list[Any]:
    if not ranks.distributed:
        return [obj]
    out: list[Any] = [None] * ranks.size
    dist.all_gather_object(out, obj)
    return out


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


class TrainModule(nn.Module):
    """The model as training runs it (and as DDP/FSDP wrap it): its forward, plus a zero that
    touches the vision tower's trainable weights when a pass has no picture (see the module
    docstring). State-dict names are the model's, behind ``model.``."""

    def __init__(self, model: nn.Module, touch_vision: bool) -> None:
        super().__init__()
        self.model = model
        self.touch_vision = touch_vision

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = self.model(*args, **kwargs)
        no_media = kwargs.get("pixel_values") is None and kwargs.get("pixel_values_videos") is None
        if self.touch_vision and no_media and torch.is_grad_enabled():
            zero = sum(p.sum() for p in self.model.visual.parameters() if p.requires_grad)
            logits = logits + 0.0 * zero
        return logits


def wrap(model: nn.Module, ranks: Ranks, fsdp: bool, bf16: bool) -> nn.Module:
    """``TrainModule(model)``, under DDP or FSDP2 when there are several ranks."""
    touch = ranks.distributed and any(p.requires_grad for p in model.visual.parameters())
    net = TrainModule(model, touch)
    if not ranks.distributed:
        return net
    if fsdp:
        return shard(net, bf16)
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids)


def shard(net: nn.Module, bf16: bool) -> nn.Module:
    """FSDP2: each decoder layer its own unit (gathered just for its pass), everything else
    (embedding, head, and the vision tower, which not every rank runs) in the root unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in net.model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(net, mp_policy=mp)
    return net


def inner(net: nn.Module) -> nn.Module:
    """The :class:`TrainModule` under a DDP wrapper (FSDP2 modifies the module in place)."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def wrap_frozen(model: nn.Module | None, ranks: Ranks, fsdp: bool, bf16: bool) -> nn.Module | None:
    """A frozen model run beside the trained one (DPO's reference): sharded like it under FSDP,
    else a plain replica."""
    if model is None or not (fsdp and ranks.distributed):
        return model
    return shard(TrainModule(model, False), bf16)
