"""``qwenvl train`` and ``qwenvl merge-lora``: thin wrappers over :mod:`qwenvl.train`.

Registered in :data:`qwenvl.cli.main.SUBCOMMANDS` like every subcommand; the options of
``TrainConfig`` and ``LoraOptions`` take their defaults from those dataclasses.
"""

from __future__ import annotations

import argparse
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
        "(a Hugging Face checkpoint, or a peft adapter with --lora).",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder")
    p.add_argument("--data", required=True, metavar="FILE", help="training JSON lines")
    p.add_argument("--output", required=True, metavar="DIR", help="run folder")
    p.add_argument(
        "--eval-data",
        default=_default("eval_data"),
        metavar="FILE",
        help="held-out JSON lines",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=_default("eval_every"),
        metavar="N",
        help="evaluate every N steps",
    )
    p.add_argument("--method", choices=["sft", "dpo"], default=_default("method"))
    p.add_argument("--dpo-beta", type=float, default=_default("dpo_beta"))
    _add_lora_args(p.add_argument_group("LoRA (peft)"))
    g = p.add_argument_group("what trains")
    for part in ("vision", "merger", "llm"):
        g.add_argument(f"--freeze-{part}", action="store_true", default=_default(f"freeze_{part}"))
    _add_optimisation_args(p.add_argument_group("optimisation"))
    _add_data_args(p.add_argument_group("data"))
    _add_checkpoint_args(p.add_argument_group("checkpoints"))
    p.set_defaults(func=cmd_train)


def _default(name: str) -> Any:
    return default(TrainConfig, name)


def _add_lora_args(g: argparse._ArgumentGroup) -> None:
    """Options of :class:`LoraOptions` (and --lora, which turns it on)."""
    g.add_argument("--lora", action="store_true", help="train a LoRA adapter, not all weights")
    g.add_argument("--lora-rank", type=int, default=default(LoraOptions, "rank"))
    g.add_argument("--lora-alpha", type=float, default=default(LoraOptions, "alpha"))
    g.add_argument("--lora-dropout", type=float, default=default(LoraOptions, "dropout"))
    g.add_argument(
        "--lora-targets",
        default=",".join(default(LoraOptions, "targets")),
        help="comma-separated module names, dotted suffixes or regexes",
    )


def _add_optimisation_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--lr", type=float, default=_default("lr"))
    g.add_argument("--vision-lr", type=float, default=_default("vision_lr"))
    g.add_argument("--merger-lr", type=float, default=_default("merger_lr"))
    g.add_argument("--weight-decay", type=float, default=_default("weight_decay"))
    g.add_argument("--warmup-steps", type=int, default=_default("warmup_steps"))
    g.add_argument("--min-lr-ratio", type=float, default=_default("min_lr_ratio"))
    g.add_argument("--epochs", type=int, default=_default("epochs"))
    g.add_argument("--max-steps", type=int, default=_default("max_steps"))
    g.add_argument("--batch-size", type=int, default=_default("batch_size"))
    g.add_argument("--grad-accum", type=int, default=_default("grad_accum"))
    g.add_argument(
        "--max-grad-norm",
        type=float,
        default=_default("max_grad_norm"),
        help="0 disables clipping",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=_default("gradient_checkpointing"),
    )
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=_default("precision"))
    g.add_argument("--dtype", default=_default("dtype"), choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default=_default("device"))
    g.add_argument("--seed", type=int, default=_default("seed"))


def _add_data_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--pack",
        type=int,
        default=_default("pack"),
        metavar="TOKENS",
        help="pack samples into rows",
    )
    g.add_argument(
        "--max-len",
        type=int,
        default=_default("max_len"),
        metavar="TOKENS",
        help="longest sample (default: --pack)",
    )
    g.add_argument("--overlong", choices=["reject", "split"], default=_default("overlong"))
    g.add_argument("--min-pixels", type=int, default=_default("min_pixels"))
    g.add_argument("--max-pixels", type=int, default=_default("max_pixels"))


def _add_checkpoint_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--save-every", type=int, default=_default("save_every"), metavar="N")
    g.add_argument(
        "--save-total-limit", type=int, default=_default("save_total_limit"), metavar="K"
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=_default("resume"),
        help="a checkpoint folder, or latest",
    )
    g.add_argument("--export-dtype", default=_default("export_dtype"))
    g.add_argument("--no-progress", action="store_true")


def cmd_train(args: argparse.Namespace) -> int:
    lora = None
    if args.lora:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora = LoraOptions(args.lora_rank, args.lora_alpha, args.lora_dropout, targets)
    config = TrainConfig(
        model=args.model, data=args.data, output=args.output, method=args.method,
        eval_data=args.eval_data, eval_every=args.eval_every, dpo_beta=args.dpo_beta, lora=lora,
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
    )  # fmt: skip
    result = train(config)
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
