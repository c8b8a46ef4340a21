"""Tensor-parallel inference: the ranks, how they start, how every step reaches them, how they end.

Rank 0 is the engine: scheduler, block manager, vision tower, sampler, server. Every rank holds
its share of the decoder (``models/parallel.py``) and a KV cache of its own heads with the same
blocks. Each step rank 0 prepares the inputs (:class:`~qwenvl.engine.model_runner.StepInputs`,
vision features included), broadcasts them on a gloo group, and all ranks run the decoder
together (all-reduces on the default group: NCCL on GPUs, gloo on CPUs); rank 0 samples and the
tokens never leave it, so seeded sampling gives the same tokens at any size.

Launch: ``LLM(path, tensor_parallel_size=N)`` spawns ranks 1..N-1 on this machine; under
``torchrun`` (``RANK``/``WORLD_SIZE`` set) the ranks are torchrun's, on any number of machines,
and the CLI sends every rank but 0 to :func:`serve_model`. Workers die with rank 0: they stop when
it says so, when its connection drops, or (spawned here) when its process dies
(``PR_SET_PDEATHSIG``). A worker that dies makes rank 0's step raise :class:`EngineDeadError`.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qwenvl.engine.config import EngineConfig
from qwenvl.engine.kv_cache import PagedKVCache, kv_blocks_for, kv_bytes_per_block
from qwenvl.engine.model_runner import ModelRunner, StepInputs
from qwenvl.errors import ConfigError, EngineDeadError

logger = logging.getLogger(__name__)

# the model's collectives: a step's ranks enter together, so a long wait means a stuck peer
STEP_TIMEOUT = datetime.timedelta(minutes=10)
# the step broadcast: a worker waits there while rank 0 is idle, for as long as the server runs
IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class Load:
    """What every rank loads: the checkpoint, the dtype and weight format rank 0 chose for it,
    the device type and the engine settings (for the KV cache)."""

    path: str  # rank 0's folder; another machine without it resolves ``name`` itself
    name: str
    dtype: str | torch.dtype
    weight_format: str | None
    device: str  # "cpu" or "cuda": each rank takes its own cuda:<local rank>
    engine: EngineConfig


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a ``torchrun`` job of more than one process."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Group:
    """The ranks seen from one of them: the step broadcast on a gloo group (objects travel on
    the CPU whatever the model's device), the model's collectives on the default group.
    ``local_rank``/``local_size``: this rank among the ranks on its machine (its GPU; how many
    share its CPUs and RAM)."""

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int) -> None:
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = local_rank, local_size
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def device(self, kind: str) -> torch.device:
        """cuda:<local rank> on GPUs, else the CPU."""
        return (
            torch.device("cuda", self.local_rank)
            if kind.startswith("cuda")
            else torch.device("cpu")
        )

    def share_cpu(self) -> None:
        """Ranks on one machine's CPUs split its cores (oversubscribed threads spin at
        barriers), unless the user set ``OMP_NUM_THREADS``."""
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, _cores() // self.local_size))

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())


def init_group(
    rank: int, size: int, device: str, init_method: str, local: tuple[int, int]
) -> Group:
    """Join the ranks (``local``: this rank's place among those on its machine)."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(local[0])
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=size, timeout=STEP_TIMEOUT
    )
    return Group(rank, size, *local)


def _torchrun_local() -> tuple[int, int]:
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def load_shard(
    load: Load, group: Group, progress: Callable[[int, int], None] | None = None
) -> tuple[Any, int]:
    """This rank's share of the model and the number of KV blocks all ranks agreed on (the
    fewest any rank has memory for)."""
    from qwenvl.checkpoint import load_config, load_model
    from qwenvl.models import family_of

    if load.device == "cpu":
        group.share_cpu()
    path = Path(load.path)
    if not path.is_dir():
        from qwenvl.checkpoint import resolve_checkpoint

        path = resolve_checkpoint(load.name)
    config = load_config(path)
    family = family_of(config)
    plan = family.shard(config, group.rank, group.size)
    device = group.device(load.device)
    model, local = load_model(
        path,
        dtype=load.dtype,
        device=device,
        weight_format=load.weight_format,
        shard=plan,
        progress=progress,
    )
    cfg = load.engine
    max_len = cfg.max_model_len or family.max_model_len(local)
    per_block = kv_bytes_per_block(family.kv_shape(local), cfg.block_size, model.dtype)
    sharing = group.local_size if device.type == "cpu" else 1
    blocks = cfg.num_kv_blocks or kv_blocks_for(cfg, max_len, per_block, device, sharing)
    return model, group.min(blocks)


# --- rank 0 ----------------------------------------------------------------------------------
class Workers:
    """Ranks 1..N-1 seen from rank 0: the step broadcast, their processes (when spawned here),
    and the end of them."""

    def __init__(self, group: Group, procs: list[Any]) -> None:
        self.group = group
        self.procs = procs
        self.lost: str | None = None  # why the workers can no longer be reached
        self.on_lost: Callable[[str], None] | None = None
        self._closed = False
        self._threads = torch.get_num_threads()  # rank 0 shares the CPU until shutdown
        for rank, p in enumerate(procs, 1):
            threading.Thread(target=self._watch, args=(rank, p), daemon=True).start()

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if not self._closed:
            self.mark_lost(f"rank {rank} {_exit(code)}")

    def dead_rank(self, grace: float = 1.0) -> str | None:
        """Which spawned rank died, if one did (its exit is seen within ``grace`` seconds of the
        broken connection it caused)."""
        deadline = time.monotonic() + grace
        while True:
            for rank, p in enumerate(self.procs, 1):
                if p.poll() is not None:
                    return f"rank {rank} {_exit(p.returncode)}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def mark_lost(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            logger.error("tensor-parallel worker lost: %s", why)
            if self.on_lost is not None:
                self.on_lost(why)

    def error(self) -> EngineDeadError:
        if self._closed and self.lost is None:
            return EngineDeadError("this LLM was shut down; create a new one to generate")
        return EngineDeadError(
            f"a tensor-parallel worker is gone ({self.lost}); the engine cannot run any more "
            "steps, restart it"
        )

    def send(self, step: StepInputs | None) -> None:
        self.group.broadcast(step)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Tell the workers to stop, wait for them (then kill what is left), leave the group."""
        if self._closed:
            return
        self._closed = True
        if self.lost is None:
            try:
                self.send(None)
            except Exception as e:  # a worker already gone: the kill below ends the rest
                logger.warning("could not tell the workers to stop: %s", e)
        else:  # the group is broken: the others wait in a collective that will never finish
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout)
        try:
            dist.destroy_process_group()
        except Exception as e:  # pragma: no cover - a broken group on the way out
            logger.warning("leaving the process group: %s", e)
        torch.set_num_threads(self._threads)

    @property
    def closed(self) -> bool:
        return self._closed


def _exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class ParallelRunner(ModelRunner):
    """Rank 0's runner: each step is sent to the workers, then run here with them. A failure
    of the group (a worker gone) breaks the engine for good: every later step raises."""

    def __init__(self, *args: Any, workers: Workers, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.workers = workers
        # the vision tower runs here alone while the other ranks wait for the step: on a CPU
        # machine it takes the cores they are not using
        cpu = self.model.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ
        self.vision_threads = _cores() if cpu and workers.procs else None

    def _encode_missing(self, wanted: Any) -> None:
        if self.vision_threads is None:
            return super()._encode_missing(wanted)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.vision_threads)
        try:
            super()._encode_missing(wanted)
        finally:
            torch.set_num_threads(threads)

    def execute(self, step: StepInputs) -> torch.Tensor:
        w = self.workers
        if w.lost is not None or w.closed:
            raise w.error()
        try:
            w.send(step)
            return super().execute(step)
        except (RuntimeError, dist.DistError) as e:
            w.mark_lost(w.dead_rank() or f"{type(e).__name__}: {str(e)[:200]}")
            raise w.error() from e


def start(size: int, load: Load) -> tuple[Group, Workers]:
    """Rank 0 of ``size``: join torchrun's ranks, or spawn ranks 1..size-1 on this machine."""
    if dist.is_initialized():
        raise ConfigError(
            "this process already belongs to a process group (a tensor-parallel LLM that is not "
            "shut down, or training): one tensor-parallel LLM per process"
        )
    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if torchrun_rank() != 0:
            raise ConfigError("under torchrun only rank 0 builds the LLM (the others serve_model)")
        if size != world:
            raise ConfigError(
                f"tensor_parallel_size={size} but torchrun started {world} processes; "
                "they must match"
            )
        group = init_group(0, size, load.device, "env://", _torchrun_local())
        group.broadcast(load)
        return group, Workers(group, [])
    with socket.socket() as s:  # a free port for the rendezvous on this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init = f"tcp://127.0.0.1:{port}"
    # fresh interpreters, not multiprocessing: a user's script needs no __main__ guard
    procs = []
    for rank in range(1, size):
        cmd = [sys.executable, "-m", __name__, str(rank), str(size), init, load.device]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
    try:
        group = init_group(0, size, load.device, init, (0, size))
        group.broadcast(load)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return group, Workers(group, procs)


# --- ranks 1..N-1 ----------------------------------------------------------------------------
def serve_model(group: Group) -> int:
    """A worker's life: take what to load from rank 0, load the share, make the KV cache, run
    every step rank 0 sends until it sends None (0) or cannot be reached (1)."""
    try:
        load = group.broadcast(None)
        model, blocks = load_shard(load, group)
        from qwenvl.models import family_of

        cfg = load.engine
        kv = PagedKVCache(
            family_of(model.config).kv_shape(model.config),
            blocks,
            cfg.block_size,
            model.dtype,
            model.device,
        )
        runner = ModelRunner(model, kv, encoder_cache=None)
        while True:
            step = group.broadcast(None)
            if step is None:
                break
            runner.execute(step)
    except Exception as e:
        logger.error("tensor-parallel rank %d stops: %s", group.rank, e)
        return 1
    try:
        dist.destroy_process_group()
    except Exception:  # pragma: no cover
        pass
    return 0


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that spawned it dies, however it dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the dropped connection still ends us
        pass


def _spawned() -> None:
    """``python -m qwenvl.engine.parallel RANK SIZE INIT DEVICE``: a rank started by rank 0 on
    this machine."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it stops us
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # rank 0 died before the death signal was armed
        raise SystemExit(1)
    rank, size, init, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    logging.basicConfig(
        level=logging.WARNING, format=f"rank {rank} %(levelname)s %(name)s: %(message)s"
    )
    group = init_group(rank, size, device, init, (rank, size))
    raise SystemExit(serve_model(group))


def run_torchrun_worker(device: str) -> int:
    """A ``torchrun`` rank other than 0 (what the CLI's ``serve``/``chat`` run there): rank 0
    sends what to load. ``device``: ``cpu`` or ``cuda``, as on rank 0."""
    logging.basicConfig(
        level=logging.INFO, format=f"rank {torchrun_rank()} %(levelname)s %(name)s: %(message)s"
    )
    size = int(os.environ["WORLD_SIZE"])
    group = init_group(torchrun_rank(), size, device, "env://", _torchrun_local())
    return serve_model(group)


if __name__ == "__main__":
    _spawned()
