"""``qwenvl train`` and ``qwenvl merge-lora``: thin wrappers over :mod:`qwenvl.train`.

Registered in :data:`qwenvl.cli.main.SUBCOMMANDS` like every subcommand; the options of
``TrainConfig`` and ``LoraOptions`` take their defaults from those dataclasses.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qwenvl.cli.common import LOAD_DTYPES, default
from qwenvl.train import LoraOptions, TrainConfig, train

if TYPE_CHECKING:
    from qwenvl.cli.common import Subparsers


def add_train(sub: Subparsers) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a checkpoint (SFT or DPO; full or LoRA)",
        description="Fine-tune on a JSON-lines file of conversations (the LLM.chat message "
        "format). Writes OUT/metrics.jsonl, OUT/loss.png, OUT/checkpoints/step-N and OUT/final "
        "(a Hugging Face checkpoint, or a peft adapter with --lora). OUT is created once the "
        "data and the checkpoint were accepted.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder to start from")
    p.add_argument("--data", required=True, metavar="FILE", help="training JSON lines")
    p.add_argument("--output", required=True, metavar="DIR", help="run folder (OUT)")
    _option(p, "--eval-data", "eval_data", "held-out JSON lines (same format as --data)", "FILE",
            unset="none")  # fmt: skip
    _option(p, "--eval-every", "eval_every", "evaluate on --eval-data every N steps", "N", int,
            unset="only at the end")  # fmt: skip
    p.add_argument(
        "--method",
        choices=["sft", "dpo"],
        default=_default("method"),
        help="sft: learn the assistant replies; dpo: prefer 'chosen' over 'rejected' "
        "(default %(default)s)",
    )
    _option(p, "--dpo-beta", "dpo_beta", "DPO temperature (strength of the KL anchor)", "B", float)
    _option(
        p,
        "--dpo-sft-weight",
        "dpo_sft_weight",
        "add W x the chosen reply's mean token NLL to the DPO loss (RPO, LLaMA-Factory's "
        "pref_ftx), so DPO does not lower the chosen answer's likelihood; 0 = plain DPO",
        "W",
        float,
    )
    _add_lora_args(p.add_argument_group("LoRA (peft)"))
    g = p.add_argument_group("what trains")
    for part, what in (("vision", "ViT blocks"), ("merger", "patch merger"), ("llm", "LLM")):
        g.add_argument(
            f"--freeze-{part}",
            action="store_true",
            default=_default(f"freeze_{part}"),
            help=f"keep the {what} fixed (with --lora: no adapters there)",
        )
    _add_optimisation_args(p.add_argument_group("optimisation"))
    _add_data_args(p.add_argument_group("data"))
    _add_checkpoint_args(p.add_argument_group("checkpoints and output"))
    p.set_defaults(func=cmd_train)


def _default(name: str) -> Any:
    return default(TrainConfig, name)


def _option(
    g: argparse._ActionsContainer,
    flag: str,
    field: str,
    help: str,
    metavar: str | None = None,
    type: Callable[[str], Any] = str,
    cls: type = TrainConfig,
    unset: str = "not set",
) -> None:
    """An option whose default is field ``field`` of ``cls``, shown in its help (``unset`` says
    what a default of None means)."""
    value = default(cls, field)
    shown = unset if value is None else "%(default)s"
    g.add_argument(
        flag, type=type, default=value, metavar=metavar, help=f"{help} (default {shown})"
    )


def _add_lora_args(g: argparse._ArgumentGroup) -> None:
    """Options of :class:`LoraOptions` (and --lora, which turns it on)."""
    g.add_argument("--lora", action="store_true", help="train a LoRA adapter, not all weights")
    _option(g, "--lora-rank", "rank", "adapter rank r", "R", int, LoraOptions)
    _option(g, "--lora-alpha", "alpha", "scale alpha (updates scaled by alpha / r)", "A",
            float, LoraOptions)  # fmt: skip
    _option(g, "--lora-dropout", "dropout", "dropout on the adapter input", "P", float, LoraOptions)
    g.add_argument(
        "--lora-targets",
        default=",".join(default(LoraOptions, "targets")),
        metavar="NAMES",
        help="comma-separated module names, dotted suffixes or regexes (default %(default)s)",
    )
    g.add_argument(
        "--lora-parts",
        default=",".join(default(LoraOptions, "parts")),
        metavar="PARTS",
        help="where --lora-targets are looked for: llm, vision (the ViT: attn.qkv, attn.proj, "
        "mlp.*), merger; e.g. llm,vision adapts the ViT too (default %(default)s)",
    )


def _add_optimisation_args(g: argparse._ArgumentGroup) -> None:
    _option(g, "--lr", "lr", "peak learning rate", "LR", float)
    _option(g, "--vision-lr", "vision_lr", "learning rate of the ViT", "LR", float, unset="--lr")
    _option(g, "--merger-lr", "merger_lr", "learning rate of the merger", "LR", float,
            unset="--lr")  # fmt: skip
    _option(g, "--weight-decay", "weight_decay", "AdamW weight decay (matrices only)", "WD", float)
    _option(g, "--warmup-steps", "warmup_steps", "linear warmup steps", "N", int)
    _option(g, "--min-lr-ratio", "min_lr_ratio", "cosine floor, as a fraction of --lr", "R", float)
    _option(g, "--epochs", "epochs", "passes over the data", "N", int)
    _option(g, "--max-steps", "max_steps", "stop after N optimizer steps", "N", int,
            unset="--epochs decide")  # fmt: skip
    _option(g, "--batch-size", "batch_size", "rows per micro-batch", "N", int)
    _option(g, "--grad-accum", "grad_accum", "micro-batches per optimizer step", "N", int)
    _option(g, "--max-grad-norm", "max_grad_norm", "clip the gradient norm; 0 disables", "X",
            float)  # fmt: skip
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=_default("gradient_checkpointing"),
        help="recompute activations in the backward pass: less memory, ~30%% more compute",
    )
    g.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=_default("precision"),
        help="compute precision; auto = bf16 autocast on a GPU, fp32 on the CPU "
        "(default %(default)s)",
    )
    g.add_argument(
        "--dtype",
        default=_default("dtype"),
        choices=["float32", "bfloat16", "float16"],
        help="dtype the weights are trained in (default %(default)s)",
    )
    _option(g, "--device", "device", "cpu, cuda, cuda:N; auto = cuda when there is one", "DEV")
    _option(g, "--seed", "seed", "seed of the data order, init and dropout", "S", int)


def _add_data_args(g: argparse._ArgumentGroup) -> None:
    _option(g, "--pack", "pack", "pack samples into rows of this many tokens", "TOKENS", int,
            unset="one sample per row")  # fmt: skip
    _option(g, "--max-len", "max_len", "longest sample", "TOKENS", int, unset="--pack")
    g.add_argument(
        "--overlong",
        choices=["reject", "split"],
        default=_default("overlong"),
        help="a sample over --max-len: an error, or cut at turn boundaries (default %(default)s)",
    )
    _option(g, "--min-pixels", "min_pixels", "fewest pixels per image", "N", int,
            unset="the checkpoint's")  # fmt: skip
    _option(g, "--max-pixels", "max_pixels", "most pixels per image", "N", int,
            unset="the checkpoint's")  # fmt: skip
    g.add_argument(
        "--allow-outside-paths",
        action="store_true",
        default=_default("allow_outside_paths"),
        help="let media paths point outside the data file's folder (default: refused)",
    )
    _option(g, "--data-workers", "data_workers",
            "processes decoding samples ahead of the training step; 0: in the training process",
            "N", int)  # fmt: skip
    _option(g, "--prefetch", "prefetch", "steps each data worker prepares ahead", "N", int)
    g.add_argument(
        "--fsdp",
        action="store_true",
        default=_default("fsdp"),
        help="under torchrun: shard weights, gradients and optimizer state over the ranks "
        "(FSDP2) instead of replicating the model (DDP, the default)",
    )


def _add_checkpoint_args(g: argparse._ArgumentGroup) -> None:
    _option(g, "--save-every", "save_every", "write OUT/checkpoints/step-N every N steps", "N",
            int, unset="no checkpoints, only OUT/final")  # fmt: skip
    _option(g, "--save-total-limit", "save_total_limit", "keep only the newest K checkpoints",
            "K", int, unset="keep all")  # fmt: skip
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=_default("resume"),
        metavar="DIR",
        help="continue from a checkpoint folder, or (no value) the newest under OUT; the run "
        "says on stderr where it resumed (default: start from --model)",
    )
    _option(g, "--export-dtype", "export_dtype", "dtype of OUT/final; auto = the source "
            "checkpoint's", "DTYPE")  # fmt: skip
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress on stderr (default: a bar on a terminal, plain lines elsewhere)",
    )
    _option(g, "--log-every", "log_every", "off a terminal, a progress line every N steps",
            "N", int, unset="by --log-seconds only")  # fmt: skip
    _option(g, "--log-seconds", "log_seconds", "off a terminal, a progress line at least every "
            "S seconds", "S", float)  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    lora = None
    if args.lora:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        parts = tuple(t.strip() for t in args.lora_parts.split(",") if t.strip())
        lora = LoraOptions(args.lora_rank, args.lora_alpha, args.lora_dropout, targets, parts)
    config = TrainConfig(
        model=args.model, data=args.data, output=args.output, method=args.method,
        eval_data=args.eval_data, eval_every=args.eval_every, dpo_beta=args.dpo_beta, lora=lora,
        dpo_sft_weight=args.dpo_sft_weight, log_every=args.log_every,
        log_seconds=args.log_seconds,
        freeze_vision=args.freeze_vision, freeze_merger=args.freeze_merger,
        freeze_llm=args.freeze_llm, lr=args.lr, vision_lr=args.vision_lr,
        merger_lr=args.merger_lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm or None,
        gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
        dtype=args.dtype, device=args.device, seed=args.seed, pack=args.pack,
        max_len=args.max_len, overlong=args.overlong, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels, save_every=args.save_every,
        save_total_limit=args.save_total_limit, resume=args.resume,
        export_dtype=args.export_dtype, progress=False if args.no_progress else None,
        allow_outside_paths=args.allow_outside_paths, data_workers=args.data_workers,
        prefetch=args.prefetch, fsdp=args.fsdp,
    )  # fmt: skip
    result = train(config)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports
        return 0
    print(f"trained {result.steps} steps, final loss {result.last_loss:.4f}; wrote {result.final}")
    return 0


def add_merge_lora(sub: Subparsers) -> None:
    p = sub.add_parser(
        "merge-lora",
        help="fold a LoRA adapter into its base checkpoint",
        description="Write base + adapter as one checkpoint in the released Hugging Face layout.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="base checkpoint folder")
    p.add_argument("--adapter", required=True, metavar="DIR", help="peft adapter folder")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--dtype", default="auto", choices=LOAD_DTYPES)
    p.set_defaults(func=cmd_merge_lora)


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from qwenvl.train.checkpoint import merge_adapter_checkpoint

    out = merge_adapter_checkpoint(args.model, args.adapter, args.output, args.dtype)
    print(f"wrote {out}")
    return 0
