"""``qwenvl quantize``: write a 16-bit checkpoint's language model as a GPTQ or AWQ checkpoint.

A thin wrapper over :func:`qwenvl.models.quantized_export.quantize_checkpoint`; registered in
:data:`qwenvl.cli.main.SUBCOMMANDS` (``add_quantize`` / ``cmd_quantize``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qwenvl.models.quantized_export import LAYOUTS, METHODS, ExportSpec, quantize_checkpoint

if TYPE_CHECKING:
    from qwenvl.cli.common import Subparsers


def group_size(text: str) -> int:
    """``--group-size``: a positive integer, or -1 for one group per output channel."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or -1, got {text!r}"
        ) from None
    if value == 0 or value < -1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or -1, got {text!r}")
    return value


def add_quantize(sub: Subparsers) -> None:
    p = sub.add_parser(
        "quantize",
        help="write a GPTQ or AWQ checkpoint (int4 / int8 language model) from a 16-bit one",
        description="Quantise the language model's decoder linears (q/k/v/o/gate/up/down) by "
        "round-to-nearest and write them in the released GPTQ or AWQ layout, loadable by qwenvl, "
        "transformers and vLLM. The vision tower, embeddings, norms and LM head are copied "
        "unchanged. int4: asymmetric with integer zero points; int8: GPTQ symmetric.",
    )
    p.add_argument("model", metavar="MODEL", help="16-bit checkpoint folder or Hugging Face id")
    p.add_argument("--method", required=True, choices=METHODS, help="int4 or int8 weights")
    p.add_argument("--output", required=True, metavar="DIR", help="new (or empty) folder")
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="gptq",
        help="on-disk layout: gptq (auto-gptq, default) or awq (AutoAWQ gemm, int4 only)",
    )
    p.add_argument(
        "--group-size",
        type=group_size,
        default=128,
        metavar="G",
        help="inputs per scale (default 128); -1 = one per output channel (gptq only)",
    )
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    spec = ExportSpec(args.method, args.layout, args.group_size)
    result = quantize_checkpoint(args.model, args.output, spec)
    n = result.weight_bytes
    size = f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
    print(
        f"wrote {result.folder}: {spec.layout} {spec.method} (group {spec.group_size}), "
        f"{result.linears} linears quantised, {result.copied} tensors kept, "
        f"{size} in {result.files} file(s)"
    )
    return 0
