"""Training checkpoints (atomic save, exact resume on any number of ranks) and the final exports.

A training checkpoint ``OUT/checkpoints/step-000040/`` holds the trainable weights and the
optimizer state (``torch.distributed.checkpoint`` shards, fp32, loadable on any number of ranks),
the scheduler state, every rank's RNG state and the position in the data (``state.pt``). It is
written to a temporary folder and renamed into place, so a run killed at any moment leaves either
the previous checkpoint or the new one, never half of one.

The full fine-tune export is the released Hugging Face layout (flat tensor names, ``lm_head``
omitted when tied) next to the source checkpoint's config, tokenizer, chat template, preprocessor
and generation config; a LoRA export is a peft adapter folder (``lora.save_adapter``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from qwenvl.errors import CheckpointError
from qwenvl.train.distributed import Ranks, barrier, gather_objects

logger = logging.getLogger(__name__)
SINGLE = Ranks()

STATE = "state.pt"
SHARD_BYTES = 4 << 30
_WEIGHT_FILES = ("model.safetensors.index.json",)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(out: str | Path) -> Path | None:
    root = Path(out) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / STATE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


_TRAINABLE = StateDictOptions(ignore_frozen_params=True)
_PARTIAL = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen weights stay


def save_checkpoint(
    out: Path,
    step: int,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    keep: int | None = None,
    ranks: Ranks = SINGLE,
) -> Path:
    """Write ``checkpoints/step-N`` atomically; keep only the newest ``keep`` checkpoints.

    Weights and optimizer state go through ``torch.distributed.checkpoint``: each rank writes
    its own shards (FSDP) or rank 0 writes the replicated tensors (DDP, one process), under
    fully qualified names, so any number of ranks can load them back."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if ranks.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ranks)
    state = {
        "model": get_model_state_dict(net, options=_TRAINABLE),
        "optim": get_optimizer_state_dict(net, optimizer),
    }
    with warnings.catch_warnings():  # one process: DCP warns that it assumes one process
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=tmp, no_dist=not ranks.distributed)
    rngs = gather_objects(rng_state(), ranks)
    if ranks.main:
        meta = {"step": step, "scheduler": scheduler.state_dict(), "rng": rngs, **extra}
        torch.save(meta, tmp / STATE)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if keep:
            done = sorted(p for p in final.parent.glob("step-*") if (p / STATE).is_file())
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(ranks)
    return final


def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(
    folder: Path,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ranks: Ranks = SINGLE,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG (each rank's own when the number of ranks
    is the one saved); returns the saved state (step, extras)."""
    if not (folder / STATE).is_file():
        raise CheckpointError(f"{folder}: not a training checkpoint (no {STATE})")
    state = {
        "model": get_model_state_dict(net, options=_TRAINABLE),
        "optim": get_optimizer_state_dict(net, optimizer),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=folder, no_dist=not ranks.distributed)
    except Exception as e:  # DCP reports missing keys as a CheckpointException / RuntimeError
        raise CheckpointError(
            f"{folder}: cannot load it into this run (trainable parameters differ? was the run "
            f"configured differently?): {str(e)[:300]}"
        ) from e
    set_model_state_dict(net, state["model"], options=_PARTIAL)
    set_optimizer_state_dict(net, optimizer, state["optim"])
    meta = torch.load(folder / STATE, map_location="cpu", weights_only=False)
    scheduler.load_state_dict(meta["scheduler"])
    rngs = meta["rng"] if isinstance(meta["rng"], list) else [meta["rng"]]
    if len(rngs) != ranks.size:
        logger.info(
            "%s was saved by %d rank(s), resumed on %d: rank %d takes rank %d's random state",
            folder, len(rngs), ranks.size, ranks.rank, ranks.rank % len(rngs),
        )  # fmt: skip
    set_rng_state(rngs[ranks.rank % len(rngs)])
    return meta


def full_state(net: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Every weight, whole and on the CPU, on rank 0 (other ranks get ``{}``), named as the
    model names them (a ``TrainModule`` prefix dropped). All ranks must call it."""
    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )
    sd = get_model_state_dict(net, options=options)
    return {k.removeprefix("model."): v for k, v in sd.items()}


def export_hf(
    model: nn.Module | dict[str, torch.Tensor],
    source: str | Path,
    out: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` (or its state dict) in the released Hugging Face layout, with the
    source's non-weight files."""
    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((source / "config.json").read_text())
    tied = bool(
        cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings"))
    )
    tensors: dict[str, torch.Tensor] = {}
    state = model if isinstance(model, dict) else model.state_dict()
    for n, p in state.items():
        if tied and n == "lm_head.weight":
            continue
        t = p.detach().to("cpu")
        tensors[n] = (
            t.to(dtype) if dtype is not None and t.is_floating_point() else t
        ).contiguous()
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in _WEIGHT_FILES:
            shutil.copy2(f, out / f.name)
    for stale in list(out.glob("*.safetensors")) + [out / n for n in _WEIGHT_FILES]:
        stale.unlink(missing_ok=True)
    _save_sharded(tensors, out)
    if dtype is not None:
        name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        key = "torch_dtype" if "torch_dtype" in cfg else "dtype"
        cfg[key] = name[dtype]
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _save_sharded(tensors: dict[str, torch.Tensor], out: Path) -> None:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= SHARD_BYTES:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for n, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][n] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def merge_adapter_checkpoint(
    base: str | Path, adapter: str | Path, out: str | Path, dtype: str = "auto"
) -> Path:
    """Base checkpoint + LoRA adapter folder -> merged checkpoint in the released layout.

    The merge runs in float32; ``dtype`` (auto = the base checkpoint's) is what is written.
    """
    from qwenvl.checkpoint import load_model, resolve_checkpoint, resolve_dtype
    from qwenvl.train.lora import load_adapter, merge_lora

    source = resolve_checkpoint(base)
    model, config = load_model(source, dtype="float32")
    load_adapter(model, adapter)
    merge_lora(model)
    return export_hf(model, source, out, resolve_dtype(dtype, config))
