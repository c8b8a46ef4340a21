"""The training loop: SFT or DPO, full fine-tuning or LoRA, on one device.

Per step: ``grad_accum`` micro-batches of ``batch_size`` rows (a row is one sample, or several
packed to the ``pack`` token budget), a loss normalised by the step's number of target tokens (so
accumulation is exact), clipping, AdamW, and a warmup + cosine learning rate. fp32 on the CPU; on a
GPU the forward runs under bf16 autocast over fp32 weights.

The data order of every epoch is a pure function of (seed, epoch), so a checkpoint only needs the
step number to continue exactly where it stopped.
"""

from __future__ import annotations

import copy
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

from qwenvl.checkpoint import load_config, load_model, resolve_checkpoint, resolve_dtype
from qwenvl.errors import ConfigError
from qwenvl.processing.prompt import Processor
from qwenvl.train import checkpoint as ckpt
from qwenvl.train.data import load_dpo, load_sft
from qwenvl.train.dpo import chosen_tokens, dpo_loss, pair_logprobs, reference_logprobs
from qwenvl.train.lora import LoraOptions, apply_lora, part_of, save_adapter
from qwenvl.train.packing import collate, pack, sample_losses

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
    called after every optimizer step (and after its checkpoint, if one is due)."""

    def __init__(self, config: TrainConfig, on_step_end: StepHook | None = None) -> None:
        self.cfg = c = config
        self.on_step_end = on_step_end
        self.out = Path(c.output)  # created by run(), once the data and weights were accepted
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device
        )
        bf16 = c.precision == "bf16" or (c.precision == "auto" and self.device.type == "cuda")
        self.autocast = bf16
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        self.source = resolve_checkpoint(c.model)
        self.model_config = load_config(self.source)
        self.processor = Processor.from_pretrained(
            self.source, self.model_config, min_pixels=c.min_pixels, max_pixels=c.max_pixels
        )
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        max_len = c.max_len or c.pack
        if c.method == "dpo":
            self.units = load_dpo(c.data, self.processor, max_len)
            self.eval_units = load_dpo(c.eval_data, self.processor, max_len) if c.eval_data else []
        else:
            self.units = [[s] for s in load_sft(c.data, self.processor, max_len, c.overlong)]
            self.eval_units = (
                [[s] for s in load_sft(c.eval_data, self.processor, max_len, c.overlong)]
                if c.eval_data
                else []
            )
        # the data is checked and encoded first: a bad line fails before a long weight load
        self.model, _ = load_model(self.source, dtype=c.dtype, device=self.device)
        self._setup_trainable()
        self.reference: nn.Module | None = None
        if c.method == "dpo" and c.lora is None:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.plans = [self._plan(e) for e in range(c.epochs)]
        self.total_steps = sum(len(p) for p in self.plans)
        if c.max_steps is not None:
            self.total_steps = min(self.total_steps, c.max_steps)
        self.optimizer = torch.optim.AdamW(self._param_groups(), betas=c.betas, foreach=False)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(c.warmup_steps, self.total_steps, c.min_lr_ratio)
        )
        self.step = 0
        self.metrics: list[dict[str, Any]] = []

    # --- setup ---------------------------------------------------------------------------------
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

    def _plan(self, epoch: int) -> list[list[list[list[int]]]]:
        """Steps -> micro-batches -> rows -> unit indices, for one epoch."""
        c = self.cfg
        g = torch.Generator().manual_seed(c.seed * 1000 + epoch)
        order = torch.randperm(len(self.units), generator=g).tolist()
        if c.pack and c.method == "sft":
            lengths = [len(u[0]) for u in self.units]
            rows = pack(lengths, c.pack, order)
        else:
            rows = [[i] for i in order]
        mbs = [rows[i : i + c.batch_size] for i in range(0, len(rows), c.batch_size)]
        return [mbs[i : i + c.grad_accum] for i in range(0, len(mbs), c.grad_accum)]

    def _step_plan(self, step: int) -> list[list[list[int]]]:
        for plan in self.plans:
            if step < len(plan):
                return plan[step]
            step -= len(plan)
        raise IndexError(step)

    def _epoch_of(self, step: int) -> int:
        for e, plan in enumerate(self.plans):
            if step < len(plan):
                return e
            step -= len(plan)
        return len(self.plans) - 1

    def _rows(self, micro: list[list[int]], units: list[list[Any]]) -> list[list[Any]]:
        return [[s for i in row for s in units[i]] for row in micro]

    def _ctx(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # --- losses --------------------------------------------------------------------------------
    def _micro_loss(self, batch, step_norm: float) -> tuple[torch.Tensor, dict[str, float]]:
        if self.cfg.method == "dpo":
            with self._ctx():  # the reference runs in the same precision as the policy
                ref_c, ref_r = reference_logprobs(self.model, self.reference, batch)
                pol_c, pol_r = pair_logprobs(self.model, batch)
            losses, margins = dpo_loss(
                pol_c, pol_r, ref_c, ref_r, self.cfg.dpo_beta,
                self.cfg.dpo_sft_weight, chosen_tokens(batch),
            )  # fmt: skip
            stats = {"margin": float(margins.detach().sum()), "loss": float(losses.detach().sum())}
            return losses.sum() / step_norm, stats
        with self._ctx():
            losses = sample_losses(self.model, batch)
        return losses.sum() / step_norm, {"loss": float(losses.detach().sum())}

    def _norm(self, micro_batches: list[list[list[int]]], units: list[list[Any]]) -> float:
        if self.cfg.method == "dpo":
            return float(sum(len(row) for mb in micro_batches for row in mb))
        return float(
            sum(units[i][0].num_targets for mb in micro_batches for row in mb for i in row)
        )

    def evaluate(self) -> dict[str, float]:
        """Mean loss (per target token; per pair for DPO) over the held-out set."""
        if not self.eval_units:
            return {}
        self.model.eval()
        total, norm, margin = 0.0, 0.0, 0.0
        c = self.cfg
        rows = [[i] for i in range(len(self.eval_units))]
        with torch.no_grad():
            for k in range(0, len(rows), c.batch_size):
                micro = rows[k : k + c.batch_size]
                batch = collate(self._rows(micro, self.eval_units), self.pad_id)
                n = self._norm([micro], self.eval_units)
                _, stats = self._micro_loss(batch, 1.0)
                total += stats["loss"]
                margin += stats.get("margin", 0.0)
                norm += n
        self.model.train()
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
        state = ckpt.load_checkpoint(folder, self.model, self.optimizer, self.scheduler)
        self.step = state["step"]
        metrics_path = self.out / "metrics.jsonl"
        if metrics_path.exists():  # drop what the interrupted run logged after the checkpoint
            lines = metrics_path.read_text().splitlines()
            kept = [ln for ln in lines if ln and json.loads(ln).get("step", 0) <= self.step]
            metrics_path.write_text("".join(ln + "\n" for ln in kept))
            self.metrics = [json.loads(ln) for ln in kept]
        self.resumed_from = folder

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.append(record)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self) -> TrainResult:
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(asdict(c), indent=2, default=str))
        self._resume()
        if self.step == 0:
            (self.out / "metrics.jsonl").write_text("")
        mode = "off" if c.progress is False else "bar" if sys.stderr.isatty() else "lines"
        bar = Progress(self.total_steps, mode, c.log_every, c.log_seconds)
        if self.step:
            bar.note(f"resumed from {self.resumed_from} at step {self.step}/{self.total_steps}")
        start = time.perf_counter()
        tokens_seen = 0
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            micro_batches = self._step_plan(self.step)
            norm = self._norm(micro_batches, self.units)
            loss_sum, margin_sum, tokens = 0.0, 0.0, 0
            for micro in micro_batches:
                batch = collate(self._rows(micro, self.units), self.pad_id)
                loss, stats = self._micro_loss(batch, max(norm, 1.0))
                loss.backward()
                loss_sum += stats["loss"]
                margin_sum += stats.get("margin", 0.0)
                tokens += batch.num_tokens
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = (
                float(torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm))
                if c.max_grad_norm
                else None
            )
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            dt = time.perf_counter() - t0
            tokens_seen += tokens
            record: dict[str, Any] = {
                "step": self.step,
                "epoch": self._epoch_of(self.step - 1),
                "loss": loss_sum / max(norm, 1.0),
                "lr": lr,
                "tokens": tokens,
                "samples": sum(len(row) for mb in micro_batches for row in mb),
                "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                "grad_norm": grad_norm,
                "elapsed_s": time.perf_counter() - start,
            }
            if c.method == "dpo":
                record["margin"] = margin_sum / max(norm, 1.0)
            if c.eval_every and self.step % c.eval_every == 0:
                record.update(self.evaluate())
            self._log(record)
            bar.update(self.step, record)
            if c.save_every and self.step % c.save_every == 0 and self.step < self.total_steps:
                ckpt.save_checkpoint(
                    self.out,
                    self.step,
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    {"epoch": record["epoch"]},
                    c.save_total_limit,
                )
            if self.on_step_end is not None:
                self.on_step_end(self.step, record)
        bar.close()
        if self.eval_units and not (c.eval_every and self.step % c.eval_every == 0):
            self._log({"step": self.step, **self.evaluate()})
        final = self.export(self.out / "final")
        if c.plot:
            from qwenvl.train.plot import plot_losses

            plot_losses(self.metrics, self.out / "loss.png")
        return TrainResult(self.out, final, self.step, list(self.metrics))

    def export(self, folder: Path) -> Path:
        """The LoRA adapter (peft layout) or the full model (released Hugging Face layout)."""
        if self.cfg.lora is not None:
            return save_adapter(self.model, folder, base_model=str(self.source))
        dtype = None
        if self.cfg.export_dtype != "auto":
            dtype = resolve_dtype(self.cfg.export_dtype, self.model_config)
        elif self.model_config.torch_dtype:
            dtype = resolve_dtype("auto", self.model_config)
        return ckpt.export_hf(self.model, self.source, folder, dtype)


def train(config: TrainConfig, on_step_end: StepHook | None = None) -> TrainResult:
    """Run a training job; see :class:`TrainConfig`."""
    return Trainer(config, on_step_end).run()
