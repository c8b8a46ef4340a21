"""The training loop: SFT or DPO, full fine-tuning or LoRA, in one process or on every rank of
a ``torchrun`` job (DDP, or FSDP2 with ``fsdp``; see :mod:`qwenvl.train.distributed`).

Per step: ``grad_accum`` micro-batches of ``batch_size`` rows per rank (a row is one sample, or
several packed to the ``pack`` token budget), a loss normalised by the global batch's number of
target tokens (so accumulation and data parallelism are exact), clipping, AdamW, and a warmup +
cosine learning rate. fp32 on the CPU; on a GPU bf16 autocast over fp32 weights (FSDP: its
mixed-precision policy). Samples are decoded by DataLoader workers a few steps ahead
(:mod:`qwenvl.train.dataset`), so memory does not grow with the dataset.

The data order of every epoch is a pure function of (seed, epoch) (:mod:`qwenvl.train.plan`), so
a checkpoint only needs the step number to continue exactly where it stopped, on any number of
ranks.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from qwenvl.checkpoint import load_config, load_model, resolve_checkpoint, resolve_dtype
from qwenvl.errors import ConfigError
from qwenvl.processing.prompt import Processor
from qwenvl.train import checkpoint as ckpt
from qwenvl.train import distributed
from qwenvl.train.data import DataError
from qwenvl.train.dataset import StepData, StepShare, Units, build_index, index_entries, step_loader
from qwenvl.train.dpo import chosen_tokens, dpo_loss, pair_logprobs, reference_logprobs
from qwenvl.train.lora import LoraOptions, apply_lora, part_of, save_adapter
from qwenvl.train.packing import collate, sample_losses
from qwenvl.train.plan import StepPlan, rank_share

logger = logging.getLogger(__name__)

StepHook = Callable[[int, dict[str, Any]], None]


@dataclass
class TrainConfig:
    """Everything a run needs; ``qwenvl train`` fills it from the command line.

    ``lora=None`` means full fine-tuning. ``pack`` is the token budget of a packed row (None: one
    sample per row). ``overlong`` says what happens to a sample over ``max_len`` (default: the
    pack budget): ``reject`` (an error naming the line) or ``split`` (at turn boundaries only).
    """

    model: str
    data: str
    output: str
    method: str = "sft"  # or "dpo"
    eval_data: str | None = None
    lora: LoraOptions | None = None
    freeze_vision: bool = False
    freeze_merger: bool = False
    freeze_llm: bool = False
    lr: float = 1e-5
    vision_lr: float | None = None
    merger_lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto | fp32 | bf16 (autocast)
    dtype: str = "float32"  # weights
    device: str = "auto"
    seed: int = 0
    pack: int | None = None
    max_len: int | None = None
    overlong: str = "reject"
    eval_every: int | None = None
    save_every: int | None = None
    save_total_limit: int | None = None
    resume: str | None = None  # a checkpoint folder, or "latest" (newest under output)
    dpo_beta: float = 0.1
    dpo_sft_weight: float = 0.0  # DPO + this x the chosen reply's mean token NLL (RPO, pref_ftx)
    min_pixels: int | None = None
    max_pixels: int | None = None
    export_dtype: str = "auto"  # full fine-tune export: auto = the source checkpoint's
    progress: bool | None = None  # None/True: a bar on a terminal, lines elsewhere; False: off
    log_every: int | None = None  # plain progress line every N steps (and every log_seconds)
    log_seconds: float = 30.0
    plot: bool = True
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2)
    allow_outside_paths: bool = False  # media files may lie outside the data file's folder
    data_workers: int = 2  # DataLoader processes decoding samples (0: in the training process)
    prefetch: int = 2  # steps each data worker prepares ahead (memory: workers x prefetch)

    def __post_init__(self) -> None:
        if self.method not in ("sft", "dpo"):
            raise ConfigError(f"method must be sft or dpo, not {self.method!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")
        if self.overlong not in ("reject", "split"):
            raise ConfigError("overlong must be reject or split")
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.lr <= 0:
            raise ConfigError("lr must be positive")
        if self.freeze_vision and self.freeze_merger and self.freeze_llm:
            raise ConfigError("every part is frozen: nothing to train")
        if self.dpo_sft_weight < 0 or self.dpo_beta <= 0:
            raise ConfigError("dpo_beta must be positive and dpo_sft_weight at least 0")
        if (self.log_every is not None and self.log_every < 1) or self.log_seconds <= 0:
            raise ConfigError("log_every must be at least 1 and log_seconds positive")
        if self.data_workers < 0 or self.prefetch < 1:
            raise ConfigError("data_workers must be at least 0 and prefetch at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps must be at least 1")


@dataclass
class TrainResult:
    output: Path
    final: Path | None
    steps: int
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_loss(self) -> float:
        return [m for m in self.metrics if "loss" in m][-1]["loss"]


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine down to ``min_ratio`` at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class Progress:
    """Progress on stderr: step/total, loss, learning rate, samples/s and ETA.

    On a terminal, a bar redrawn in place every step. Elsewhere (nohup, CI, a pipe) a carriage-
    return bar would be one unreadable line that only appears at the end, so plain lines are
    printed instead: at the first and last step, every ``every`` steps, and whenever ``seconds``
    have passed since the previous line.
    """

    def __init__(
        self, total: int, mode: str, every: int | None = None, seconds: float = 30.0
    ) -> None:
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode must be bar, lines or off, not {mode!r}")
        self.total, self.mode, self.every, self.seconds = total, mode, every, seconds
        self.start = self.last_line = time.perf_counter()
        self.first: int | None = None
        self.samples = 0

    def note(self, message: str) -> None:
        """A one-off line (where a resumed run started), shown in every mode but ``off``."""
        if self.mode != "off":
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    def update(self, step: int, m: dict[str, Any]) -> None:
        if self.mode == "off":
            return
        if self.first is None:
            self.first = step - 1
        self.samples += m.get("samples", 0)
        now = time.perf_counter()
        elapsed = now - self.start
        eta = elapsed / max(step - self.first, 1) * (self.total - step)
        text = (
            f"step {step}/{self.total} loss {m['loss']:.4f} lr {m['lr']:.2e} "
            f"{self.samples / max(elapsed, 1e-9):.2f} samples/s "
            f"{m['tokens_per_s']:,.0f} tok/s ETA {_clock(eta)}"
        )
        if self.mode == "bar":
            filled = int(20 * step / max(self.total, 1))
            sys.stderr.write(f"\r{text} [{'#' * filled}{'.' * (20 - filled)}]")
        elif self._line_due(step, now):
            extra = "".join(f" {k} {m[k]:.4f}" for k in ("margin", "eval_loss") if k in m)
            sys.stderr.write(f"{text} elapsed {_clock(elapsed)}{extra}\n")
            self.last_line = now
        sys.stderr.flush()

    def _line_due(self, step: int, now: float) -> bool:
        return (
            step == self.first + 1
            or step >= self.total
            or (self.every is not None and step % self.every == 0)
            or now - self.last_line >= self.seconds
        )

    def close(self) -> None:
        if self.mode == "bar":
            sys.stderr.write("\n")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Trainer:
    """Build with a :class:`TrainConfig`, then :meth:`run`. ``on_step_end(step, metrics)`` is
    called after every optimizer step (and after its checkpoint, if one is due).

    Under ``torchrun`` every rank builds one; rank 0 alone writes metrics, plots and exports."""

    def __init__(self, config: TrainConfig, on_step_end: StepHook | None = None) -> None:
        self.cfg = c = config
        self.on_step_end = on_step_end
        self.out = Path(c.output)  # created by run(), once the data and weights were accepted
        self.ranks, self.device = distributed.join(c.device)
        if c.fsdp and not self.ranks.distributed:
            raise ConfigError(
                "--fsdp runs under torchrun: torchrun --nproc-per-node N -m qwenvl train ..."
            )
        bf16 = c.precision == "bf16" or (c.precision == "auto" and self.device.type == "cuda")
        self.autocast = bf16 and not c.fsdp  # FSDP casts through its mixed-precision policy
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        self.source = resolve_checkpoint(c.model)
        self.model_config = load_config(self.source)
        self.processor = Processor.from_pretrained(
            self.source, self.model_config, min_pixels=c.min_pixels, max_pixels=c.max_pixels
        )
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        # the data is checked and indexed first: a bad line fails before a long weight load
        self.units = self._index(c.data)
        self.eval_units = self._index(c.eval_data) if c.eval_data else []
        self.model, _ = load_model(self.source, dtype=c.dtype, device=self.device)
        self._setup_trainable()
        reference = None
        if c.method == "dpo" and c.lora is None:
            reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.net = distributed.wrap(self.model, self.ranks, c.fsdp, bf16)
        self.reference = distributed.wrap_frozen(reference, self.ranks, c.fsdp, bf16)
        lengths = [sum(n) for n in self.units.index.lengths]
        pack_budget = c.pack if c.method == "sft" else None
        world = self.ranks.size
        self.plan = StepPlan(lengths, c.seed, c.batch_size, c.grad_accum * world, pack_budget)
        self.total_steps = self._total_steps()
        self.optimizer = torch.optim.AdamW(self._param_groups(), betas=c.betas, foreach=False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(c.warmup_steps, self.total_steps, c.min_lr_ratio)
        )
        self.step = 0
        self.metrics: list[dict[str, Any]] = []

    # --- setup ---------------------------------------------------------------------------------
    def _index(self, path: str) -> Units:
        """Check and index ``path``, each rank taking every ``size``-th line (with its data
        workers); every rank gets the whole index, or the same error."""
        c, r = self.cfg, self.ranks
        t0 = time.perf_counter()
        max_len = c.max_len or c.pack
        mine = index_entries(path, self.processor, c.method, max_len, c.overlong,
                             c.allow_outside_paths, workers=c.data_workers,
                             share=(r.rank, r.size))  # fmt: skip
        entries = [e for part in distributed.gather_objects(mine, r) for e in part]
        index = build_index(path, c.method, c.allow_outside_paths, entries)
        logger.info("%s: %d units indexed in %.1f s", path, len(index), time.perf_counter() - t0)
        return Units(index, self.processor)

    def _total_steps(self) -> int:
        c = self.cfg
        in_epochs = self.plan.steps_in_epochs(c.epochs)
        self.notes: list[str] = []
        if c.max_steps is None or c.max_steps == in_epochs:
            return in_epochs if c.max_steps is None else c.max_steps
        if c.max_steps > in_epochs:
            epochs = self.plan.locate(c.max_steps - 1)[0] + 1
            self.notes.append(
                f"max_steps {c.max_steps} is more than {c.epochs} epoch(s) give ({in_epochs} "
                f"steps): training goes on over {epochs} epochs"
            )
        return c.max_steps

    def _frozen_parts(self) -> list[str]:
        c = self.cfg
        return [p for p, f in (("vision", c.freeze_vision), ("merger", c.freeze_merger),
                               ("llm", c.freeze_llm)) if f]  # fmt: skip

    def _setup_trainable(self) -> None:
        c = self.cfg
        frozen = self._frozen_parts()
        if c.lora is not None:
            self.lora_modules = apply_lora(self.model, c.lora, frozen)
        else:
            self.lora_modules = []
            for n, p in self.model.named_parameters():
                p.requires_grad_(part_of(n) not in frozen)
        self.model.train()
        for tower in (self.model.model, self.model.visual):
            tower.gradient_checkpointing = c.gradient_checkpointing

    def _param_groups(self) -> list[dict[str, Any]]:
        c = self.cfg
        lrs = {"llm": c.lr, "vision": c.vision_lr or c.lr, "merger": c.merger_lr or c.lr}
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                decay = p.ndim >= 2
                groups.setdefault((part_of(n), decay), []).append(p)
        if not groups:
            raise ConfigError("no trainable parameters")
        return [
            {"params": ps, "lr": lrs[part], "weight_decay": c.weight_decay if decay else 0.0}
            for (part, decay), ps in sorted(groups.items())
        ]

    def _ctx(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _sync(self, last: bool):
        """Gradients are reduced over the ranks on a step's last pass only."""
        if isinstance(self.net, nn.parallel.DistributedDataParallel) and not last:
            return self.net.no_sync()
        if self.cfg.fsdp:
            self.net.set_requires_gradient_sync(last)
        return nullcontext()

    # --- losses --------------------------------------------------------------------------------
    def _micro_loss(self, batch, step_norm: float) -> tuple[torch.Tensor, dict[str, float]]:
        if self.cfg.method == "dpo":
            with self._ctx():  # the reference runs in the same precision as the policy
                ref_c, ref_r = reference_logprobs(self.net, self.reference, batch)
                pol_c, pol_r = pair_logprobs(self.net, batch)
            losses, margins = dpo_loss(
                pol_c, pol_r, ref_c, ref_r, self.cfg.dpo_beta,
                self.cfg.dpo_sft_weight, chosen_tokens(batch),
            )  # fmt: skip
            stats = {"margin": float(margins.detach().sum()), "loss": float(losses.detach().sum())}
            return losses.sum() / step_norm, stats
        with self._ctx():
            losses = sample_losses(self.net, batch)
        return losses.sum() / step_norm, {"loss": float(losses.detach().sum())}

    def evaluate(self) -> dict[str, float]:
        """Mean loss (per target token; per pair for DPO) over the held-out set, its micro-batches
        shared over the ranks."""
        if not self.eval_units:
            return {}
        c, r = self.cfg, self.ranks
        rows = [[i] for i in range(len(self.eval_units))]
        mbs = [rows[k : k + c.batch_size] for k in range(0, len(rows), c.batch_size)]
        mine, padding, spare = rank_share(mbs, r.rank, r.size)
        total, norm, margin = 0.0, 0.0, 0.0
        self.model.eval()
        with torch.no_grad():
            for k, micro in enumerate(mine + [mine[0] if mine else spare] * padding):
                batch = collate([[s for i in row for s in self.eval_units[i]] for row in micro],
                                self.pad_id)  # fmt: skip
                _, stats = self._micro_loss(batch, 1.0)
                if k < len(mine):
                    total += stats["loss"]
                    margin += stats.get("margin", 0.0)
                    norm += len(micro) if c.method == "dpo" else batch.num_targets
        self.model.train()
        total, norm, margin = distributed.all_sum([total, norm, margin], r, self.device)
        out = {"eval_loss": total / max(norm, 1.0)}
        if c.method == "dpo":
            out["eval_margin"] = margin / max(norm, 1.0)
        return out

    # --- loop ----------------------------------------------------------------------------------
    def _resume(self) -> None:
        c = self.cfg
        if not c.resume:
            return
        folder = ckpt.latest_checkpoint(self.out) if c.resume == "latest" else Path(c.resume)
        if folder is None:
            logger.info("no checkpoint under %s; starting from scratch", self.out)
            return
        state = ckpt.load_checkpoint(folder, self.net, self.optimizer, self.scheduler, self.ranks)
        self.step = state["step"]
        metrics_path = self.out / "metrics.jsonl"
        if metrics_path.exists():  # drop what the interrupted run logged after the checkpoint
            lines = metrics_path.read_text().splitlines()
            kept = [ln for ln in lines if ln and json.loads(ln).get("step", 0) <= self.step]
            distributed.barrier(self.ranks)  # every rank read it before rank 0 rewrites it
            if self.ranks.main:
                metrics_path.write_text("".join(ln + "\n" for ln in kept))
            self.metrics = [json.loads(ln) for ln in kept]
        self.resumed_from = folder

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.append(record)
        if self.ranks.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _train_step(self, share: StepShare) -> dict[str, Any]:
        """One optimizer step on this rank's share; the loss is normalised over the global
        batch (its target tokens, or its pairs for DPO), whichever rank holds them."""
        c, r = self.cfg, self.ranks
        if share.error is not None:
            raise DataError(share.error)
        t0 = time.perf_counter()
        counts = [float(share.num_targets), float(share.media)]
        targets, media = distributed.all_sum(counts, r, self.device)
        norm = float(self.plan.num_rows(share.step)) if c.method == "dpo" else targets
        # DDP and FSDP average gradients over the ranks: each rank's share counts size times
        step_norm = max(norm, 1.0) / r.size
        sums = [0.0, 0.0, 0.0, float(share.samples)]  # loss, margin, tokens, samples
        for k, (batch, weight) in enumerate(zip(share.batches, share.weights)):
            with self._sync(k == len(share.batches) - 1):
                loss, stats = self._micro_loss(batch, step_norm)
                (loss if weight else loss * 0.0).backward()
            if weight:
                sums[0] += stats["loss"]
                sums[1] += stats.get("margin", 0.0)
                sums[2] += batch.num_tokens
        if r.distributed and not media:  # as in one process: no picture, no ViT update at all
            for p in self.model.visual.parameters():
                p.grad = None  # (not a zero gradient, on which AdamW would still move)
        grad_norm = self._clip()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss_sum, margin_sum, tokens, samples = distributed.all_sum(sums, r, self.device)
        dt = time.perf_counter() - t0
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": self.plan.locate(self.step - 1)[0],
            "loss": loss_sum / max(norm, 1.0),
            "lr": lr,
            "tokens": int(tokens),
            "samples": int(samples),
            "tokens_per_s": tokens / dt if dt > 0 else 0.0,
            "grad_norm": grad_norm,
        }
        if c.method == "dpo":
            record["margin"] = margin_sum / max(norm, 1.0)
        return record

    def _clip(self) -> float | None:
        if not self.cfg.max_grad_norm:
            return None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def _steps(self) -> DataLoader:
        """This rank's shares of the steps left, decoded by the data workers ahead of use."""
        c, r = self.cfg, self.ranks
        share = functools.partial(self.plan.share, rank=r.rank, world=r.size)
        data = StepData(self.units, share, self.pad_id)
        return step_loader(data, self.step, self.total_steps, c.data_workers, c.prefetch)

    def run(self) -> TrainResult:
        c = self.cfg
        if self.ranks.main:
            self.out.mkdir(parents=True, exist_ok=True)
            config = json.dumps(asdict(c), indent=2, default=str)
            (self.out / "train_config.json").write_text(config)
        distributed.barrier(self.ranks)
        self._resume()
        if self.step == 0 and self.ranks.main:
            (self.out / "metrics.jsonl").write_text("")
        mode = "off" if c.progress is False else "bar" if sys.stderr.isatty() else "lines"
        bar = Progress(self.total_steps, mode if self.ranks.main else "off", c.log_every,
                       c.log_seconds)  # fmt: skip
        for note in self.notes if self.ranks.main else []:
            logger.warning(note)
        if self.step:
            bar.note(f"resumed from {self.resumed_from} at step {self.step}/{self.total_steps}")
        start = time.perf_counter()
        for share in self._steps():
            record = self._train_step(share)
            record["elapsed_s"] = time.perf_counter() - start
            if c.eval_every and self.step % c.eval_every == 0:
                record.update(self.evaluate())
            self._log(record)
            bar.update(self.step, record)
            if c.save_every and self.step % c.save_every == 0 and self.step < self.total_steps:
                ckpt.save_checkpoint(self.out, self.step, self.net, self.optimizer,
                                     self.scheduler, {"epoch": record["epoch"]},
                                     c.save_total_limit, self.ranks)  # fmt: skip
            if self.on_step_end is not None:
                self.on_step_end(self.step, record)
        bar.close()
        if self.eval_units and not (c.eval_every and self.step % c.eval_every == 0):
            self._log({"step": self.step, **self.evaluate()})
        final = self.export(self.out / "final")
        if c.plot and self.ranks.main:
            from qwenvl.train.plot import plot_losses

            plot_losses(self.metrics, self.out / "loss.png")
        return TrainResult(self.out, final, self.step, list(self.metrics))

    def export(self, folder: Path) -> Path:
        """The LoRA adapter (peft layout) or the full model (released Hugging Face layout),
        gathered whole and written by rank 0."""
        lora = self.cfg.lora is not None
        state = ckpt.full_state(self.net, trainable_only=lora)  # every rank takes part
        if self.ranks.main and lora:
            weights = {n.replace(".default", ""): t for n, t in state.items() if "lora_" in n}
            save_adapter(self.model, folder, base_model=str(self.source), weights=weights)
        elif self.ranks.main:
            dtype = None
            if self.cfg.export_dtype != "auto":
                dtype = resolve_dtype(self.cfg.export_dtype, self.model_config)
            elif self.model_config.torch_dtype:
                dtype = resolve_dtype("auto", self.model_config)
            ckpt.export_hf(state, self.source, folder, dtype)
        distributed.barrier(self.ranks)
        return folder


def train(config: TrainConfig, on_step_end: StepHook | None = None) -> TrainResult:
    """Run a training job; see :class:`TrainConfig`. Under torchrun, on every rank."""
    try:
        return Trainer(config, on_step_end).run()
    finally:
        distributed.leave()
