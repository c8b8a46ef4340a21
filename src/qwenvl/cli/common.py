"""What every ``qwenvl`` subcommand shares: argument groups, option types, option defaults read
from the library's dataclasses, the device choice, the model load (with its progress bar) and
error printing.

Subcommand modules import from here and from the library, never from :mod:`qwenvl.cli.main`
(which imports them), so the modules of :mod:`qwenvl.cli` form no import cycle.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING, Any, TextIO

import torch

from qwenvl.llm import LLM
from qwenvl.models.formats import PACK_MIN_BYTES

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

# Off a terminal the load bar is drawn only for checkpoints at least this big (keeps logs clean).
PROGRESS_MIN_BYTES = 200_000_000
LOAD_DTYPES = ["auto", "float32", "bfloat16", "float16"]


def default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (its ``default_factory`` called).

    Options whose value goes into a library dataclass take their default from it, so the
    dataclass is the one place every default is written.
    """
    for f in dataclasses.fields(cls):
        if f.name != name:
            continue
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        raise ValueError(f"{cls.__name__}.{name} has no default")
    raise ValueError(f"{cls.__name__} has no field {name!r}")


def print_error(message: object) -> int:
    """Print ``error: <message>`` to stderr; returns 2, the exit code of a usage or input error."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def isatty(stream: TextIO) -> bool:
    method = getattr(stream, "isatty", None)
    return bool(method and method())


class ProgressBar:
    """A one-line load bar (percent and MB) on ``stream``, fed by ``LLM(progress=...)``.

    Drawn only when ``stream`` is a terminal or the checkpoint holds more than ``min_bytes``.
    """

    def __init__(
        self, stream: TextIO | None = None, min_bytes: int = PROGRESS_MIN_BYTES, width: int = 30
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.min_bytes = min_bytes
        self.width = width
        self._enabled: bool | None = None  # decided on the first call, once the total is known
        self._drawn = -1  # last drawn permille; redraw only when it changes
        self._open = False  # a line without its newline is on screen

    def __call__(self, done: int, total: int) -> None:
        if self._enabled is None:
            self._enabled = isatty(self.stream) or total > self.min_bytes
        if not self._enabled:
            return
        frac = min(done / total, 1.0) if total > 0 else 1.0
        permille = int(frac * 1000)
        if permille == self._drawn:
            return
        self._drawn = permille
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(
            f"\rloading weights [{bar}] {frac:6.1%} {done / 1e6:,.0f}/{total / 1e6:,.0f} MB"
        )
        self._open = done < total
        if not self._open:
            self.stream.write("\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line if the bar stopped short (an error, or tensors the loader skipped)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


# --- option types ----------------------------------------------------------------------------
def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# --- argument groups -------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="DIR",
        help="checkpoint folder or Hugging Face id (default: the bundled demo model)",
    )


def add_vision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-pixels", type=positive_int, metavar="N", help="smallest image area (pixels)"
    )
    p.add_argument(
        "--max-pixels", type=positive_int, metavar="N", help="largest image area (pixels)"
    )


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default="auto",
        choices=LOAD_DTYPES,
        help="weight and activation dtype; auto (default) = the checkpoint's, except on the CPU: "
        "bf16 decoder weights with float32 activations",
    )
    p.add_argument(
        "--quantization",
        choices=["int8", "int4"],
        help="weight-only quantised language model: int8 (per-channel scales, about 2x faster "
        "decoding) or int4 (group-wise 4-bit, quantised at load)",
    )
    p.add_argument(
        "--head-quantization",
        choices=["int8", "int4"],
        help="with --quantization int4: quantise the LM head too (default: it stays 16-bit)",
    )
    p.add_argument(
        "--pack-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store the decoder's weights in bf16 under float32 activations (the CPU decode "
        f"layout); default: on the CPU for 16-bit checkpoints of {PACK_MIN_BYTES >> 20} MiB and "
        "more",
    )
    p.add_argument(
        "--prefill-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the prefill GEMMs of bf16-packed weights and the ViT: float32 (exact) or bfloat16 "
        "(about 3x faster on CPUs with AVX512-BF16/AMX; inputs and outputs rounded to bf16); "
        "auto (default): bfloat16 on such CPUs",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1...; auto = cuda if present")
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="split the language model over N processes: GPUs cuda:0..N-1, or CPU processes "
        "(gloo); this process starts the others, or under torchrun the size must be its "
        "world size",
    )


# --- loading ---------------------------------------------------------------------------------
def resolve_device(name: str) -> str:
    """``--device``: ``auto`` is cuda when there is one, else cpu; any other name as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_llm(args: argparse.Namespace) -> LLM:
    """An ``LLM`` from the --model/--dtype/--device/--min-pixels/--max-pixels arguments. Under
    ``torchrun`` the ranks other than 0 serve their share of the model here and exit."""
    worker = torchrun_worker(args)
    if worker is not None:
        raise SystemExit(worker)
    bar = ProgressBar()
    try:
        return LLM(
            args.model,
            dtype=args.dtype,
            device=resolve_device(args.device),
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            progress=bar,
            quantization=args.quantization,
            pack_weights=args.pack_weights,
            head_quantization=args.head_quantization,
            tensor_parallel_size=args.tensor_parallel_size,
            prefill_dtype=args.prefill_dtype,
        )
    finally:
        bar.close()


def torchrun_worker(args: argparse.Namespace) -> int | None:
    """Under ``torchrun``, every rank but 0 serves its share of the model (what to load comes
    from rank 0) and returns its exit code here; None on rank 0 and outside torchrun."""
    from qwenvl.engine import parallel

    if not parallel.launched_by_torchrun() or parallel.torchrun_rank() == 0:
        return None
    return parallel.run_torchrun_worker(resolve_device(args.device))
