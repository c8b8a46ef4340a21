"""The ``qwenvl`` console script: ``qwenvl {chat,info,...} ...``, thin wrappers over the library.

A subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its arguments and
``cmd_<name>(args) -> int`` turns them into library calls; adding one means writing that pair and
listing ``_add_<name>`` in :data:`SUBCOMMANDS`. Every error qwenvl raises on purpose
(:class:`~qwenvl.errors.QwenVLError`) is printed as ``error: <message>`` with exit code 2, Ctrl-C
exits with 1, and argparse usage errors exit with 2 as usual.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

from qwenvl import __version__
from qwenvl.checkpoint import load_config, read_json, resolve_checkpoint
from qwenvl.cli.ground import _add_ground
from qwenvl.cli.serve import _add_serve
from qwenvl.cli.train import _add_merge_lora, _add_train
from qwenvl.demo import DEMO_MODEL_NAME, default_model_path
from qwenvl.demo.tasks import TASKS
from qwenvl.errors import QwenVLError
from qwenvl.llm import LLM, Messages
from qwenvl.models import ModelConfig, model_class
from qwenvl.processing.prompt import Processor
from qwenvl.sampling import SamplingParams
from qwenvl.weights import SAFE_DTYPES, read_header, weight_files

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

FAMILY_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}
# Used when neither --max-tokens nor the checkpoint's generation_config sets a limit: the library
# default (16, vLLM's) cuts chat replies short, and "up to the context" sizes the KV cache for it.
DEFAULT_MAX_TOKENS = 1024
# Off a terminal the load bar is drawn only for checkpoints at least this big (keeps logs clean).
PROGRESS_MIN_BYTES = 200_000_000
SAMPLING_ARGS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
CHAT_HELP = "commands: /image PATH, /video PATH (attach to the next turn), /reset, /help, /exit"


# --- shared pieces ---------------------------------------------------------------------------
def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


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
            self._enabled = _isatty(self.stream) or total > self.min_bytes
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="DIR",
        help="checkpoint folder or Hugging Face id (default: the bundled demo model)",
    )


def _add_vision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-pixels", type=_positive_int, metavar="N", help="smallest image area (pixels)"
    )
    p.add_argument(
        "--max-pixels", type=_positive_int, metavar="N", help="largest image area (pixels)"
    )


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight and activation dtype; auto (default) = the checkpoint's, except on the CPU: "
        "bf16 decoder weights with float32 activations",
    )
    p.add_argument(
        "--quantization",
        choices=["int8"],
        help="int8 weight-only language model (per-channel scales): about 2x faster decoding",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1...; auto = cuda if present")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help=f"most tokens per reply (default: the checkpoint's, else {DEFAULT_MAX_TOKENS})",
    )
    p.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--top-k", type=int, metavar="K")
    p.add_argument("--seed", type=int, metavar="S")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_llm(args: argparse.Namespace) -> LLM:
    """An ``LLM`` from the --model/--dtype/--device/--min-pixels/--max-pixels arguments."""
    bar = ProgressBar()
    try:
        return LLM(
            args.model,
            dtype=args.dtype,
            device=_device(args.device),
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            progress=bar,
            quantization=args.quantization,
        )
    finally:
        bar.close()


def sampling_from_args(args: argparse.Namespace, defaults: SamplingParams) -> SamplingParams:
    """Only the options the user gave, so the checkpoint's defaults fill in the rest."""
    given = {name: getattr(args, name) for name in SAMPLING_ARGS if getattr(args, name) is not None}
    if "max_tokens" not in given and "max_tokens" not in defaults.explicit_fields:
        given["max_tokens"] = DEFAULT_MAX_TOKENS
    return SamplingParams(**given)


# --- chat ------------------------------------------------------------------------------------
def user_message(
    text: str,
    images: list[str],
    videos: Sequence[str] = (),
    video_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A user turn: its images and videos first, then the text (the layout Qwen-VL was trained
    on). ``video_options`` (e.g. ``fps``, ``max_video_tokens``) go into every video item."""
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    content += [{"type": "video", "video": v, **(video_options or {})} for v in videos]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def stream_reply(llm: LLM, messages: Messages, params: SamplingParams, out: TextIO) -> str:
    """Write the reply to ``out`` as it is generated, then a newline; return its text."""
    parts: list[str] = []
    try:
        for event in llm.stream_chat(messages, params):
            out.write(event.text)
            out.flush()
            parts.append(event.text)
    except BaseException:
        if parts:  # end the partial reply so the error message starts on its own line
            out.write("\n")
            out.flush()
        raise
    out.write("\n")
    out.flush()
    return "".join(parts)


def interactive_chat(
    llm: LLM,
    params: SamplingParams,
    system: Messages,
    images: list[str],
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    videos: Sequence[str] = (),
    video_options: dict[str, Any] | None = None,
) -> int:
    """A multi-turn chat over lines of ``stdin``; replies (and so the model's context) accumulate.

    ``images`` and ``videos`` attach to the first user turn; ``/image PATH`` and ``/video PATH``
    attach to the next one (videos with ``video_options``).
    """
    tty = _isatty(stdin)

    def note(text: str) -> None:
        if tty:
            stderr.write(text + "\n")
            stderr.flush()

    note(f"{FAMILY_NAMES.get(llm.config.family, llm.config.family)} chat; {CHAT_HELP}")
    history: Messages = []
    pending = list(images)
    pending_videos = list(videos)
    while True:
        if tty:
            stderr.write(">>> ")
            stderr.flush()
        line = stdin.readline()
        if not line:  # EOF
            note("")
            return 0
        text = line.strip()
        if not text:
            continue
        command, _, rest = text.partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history.clear()
            pending.clear()
            pending_videos.clear()
            note("history cleared")
            continue
        if command == "/image":
            if rest.strip():
                pending.append(rest.strip())
                note(f"{len(pending)} image(s) will go with the next message")
            else:
                stderr.write("usage: /image PATH\n")
            continue
        if command == "/video":
            if rest.strip():
                pending_videos.append(rest.strip())
                note(f"{len(pending_videos)} video(s) will go with the next message")
            else:
                stderr.write("usage: /video PATH\n")
            continue
        if command == "/help":
            note(CHAT_HELP)
            continue
        turn = user_message(text, pending, pending_videos, video_options)
        pending, pending_videos = [], []
        try:
            reply = stream_reply(llm, [*system, *history, turn], params, stdout)
        except QwenVLError as e:  # a bad image or an over-long prompt ends this turn, not the chat
            stderr.write(f"error: {e}\n")
            stderr.flush()
            continue
        history += [turn, {"role": "assistant", "content": reply}]


def _add_chat(sub: Subparsers) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model (one-shot with a prompt, interactive without)",
        description="With PROMPT: stream one reply and exit. Without: an interactive chat "
        f"reading lines from stdin ({CHAT_HELP}). PROMPT '-' reads the prompt from stdin.",
    )
    _add_model_args(p)
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="X",
        help="image path, URL or data URI for the first user turn (repeatable)",
    )
    p.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="X",
        help="video file, URL or data URI for the first user turn (repeatable)",
    )
    p.add_argument("--fps", type=_positive_float, metavar="F", help="video frames sampled a second")
    p.add_argument(
        "--max-video-tokens",
        type=_positive_int,
        metavar="N",
        help="token budget of each video: smaller frames, then fewer frames, to fit",
    )
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    _add_sampling_args(p)
    _add_load_args(p)
    _add_vision_args(p)
    p.add_argument("prompt", nargs="?", help="the user message; omit for an interactive chat")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    params = sampling_from_args(args, llm.default_sampling)
    system: Messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    video_options = {
        k: v
        for k, v in (("fps", args.fps), ("max_video_tokens", args.max_video_tokens))
        if v is not None
    }
    if args.prompt is None:
        return interactive_chat(
            llm,
            params,
            system,
            args.image,
            sys.stdin,
            sys.stdout,
            sys.stderr,
            videos=args.video,
            video_options=video_options,
        )
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    turn = user_message(prompt, args.image, args.video, video_options)
    stream_reply(llm, [*system, turn], params, sys.stdout)
    return 0


# --- info ------------------------------------------------------------------------------------
def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameter counts of the model a config describes (built on the meta device: no weights).

    Tied embeddings count once: ``named_parameters`` lists a shared tensor a single time.
    """
    with torch.device("meta"):
        module = model_class(config)(config)
    total = vision = 0
    for name, p in module.named_parameters():
        total += p.numel()
        if name.startswith("visual."):
            vision += p.numel()
    return {"total": total, "vision": vision, "language": total - vision}


def describe_checkpoint(
    model: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> dict[str, Any]:
    """Everything ``qwenvl info`` shows, as a JSON-ready dict; reads no weights."""
    path = resolve_checkpoint(model)
    config = load_config(path)
    files = weight_files(path)
    stored = {spec["dtype"] for f in files for spec in read_header(f)[0].values()}
    vision_pre = Processor.from_pretrained(
        path, config, min_pixels=min_pixels, max_pixels=max_pixels
    ).vision
    token_area = vision_pre.factor**2  # pixels per merged image token (28 * 28)
    gen_path = path / "generation_config.json"
    defaults = SamplingParams.from_generation_config(
        read_json(gen_path) if gen_path.exists() else {}
    )
    t, v = config.text, config.vision
    vision: dict[str, Any] = {
        "depth": v.depth,
        "embed_dim": v.embed_dim,
        "num_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "out_hidden_size": v.out_hidden_size,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
    }
    if config.is_qwen2_5:
        vision.update(
            window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            tokens_per_second=v.tokens_per_second,
        )
    return {
        "path": str(path.resolve()),
        "model_type": config.family,
        "family": FAMILY_NAMES.get(config.family, config.family),
        "text": {
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings,
            "rope_theta": t.rope_theta,
            "mrope_section": list(t.mrope_section),
            "tie_word_embeddings": config.tie_word_embeddings,
        },
        "vision": vision,
        "parameters": count_parameters(config),
        "dtype": config.torch_dtype,
        "stored_dtypes": sorted(
            str(SAFE_DTYPES[d]).removeprefix("torch.") if d in SAFE_DTYPES else d for d in stored
        ),
        "weight_files": len(files),
        "weights_bytes": sum(f.stat().st_size for f in files),
        "disk_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "image_limits": {
            "min_pixels": vision_pre.min_pixels,
            "max_pixels": vision_pre.max_pixels,
            "min_tokens": vision_pre.min_pixels // token_area,
            "max_tokens": vision_pre.max_pixels // token_area,
        },
        "sampling_defaults": {k: getattr(defaults, k) for k in sorted(defaults.explicit_fields)},
    }


def _human(n: float, units: tuple[str, ...] = ("", "K", "M", "B", "T")) -> str:
    for unit in units[:-1]:
        if abs(n) < 1000:
            return f"{n:.2f}{unit}" if unit else f"{n:g}"
        n /= 1000
    return f"{n:.2f}{units[-1]}"


def format_info(info: dict[str, Any]) -> str:
    """``describe_checkpoint``'s dict as an aligned two-column table."""
    n = info["parameters"]
    limits = info["image_limits"]
    size = _human(info["weights_bytes"], ("B", "KB", "MB", "GB", "TB"))
    sections: list[tuple[str, list[tuple[str, Any]]]] = [
        (
            "model",
            [
                ("family", f"{info['family']} ({info['model_type']})"),
                ("path", info["path"]),
                ("parameters", f"{n['total']:,} ({_human(n['total'])})"),
                ("  vision", f"{n['vision']:,} ({_human(n['vision'])})"),
                ("  language", f"{n['language']:,} ({_human(n['language'])})"),
                ("dtype", f"{info['dtype']} (stored: {', '.join(info['stored_dtypes'])})"),
                ("size on disk", f"{size} in {info['weight_files']} weight file(s)"),
            ],
        ),
        ("text", list(info["text"].items())),
        ("vision", list(info["vision"].items())),
        (
            "image limits",
            [
                ("min_pixels", f"{limits['min_pixels']:,} ({limits['min_tokens']:,} tokens)"),
                ("max_pixels", f"{limits['max_pixels']:,} ({limits['max_tokens']:,} tokens)"),
            ],
        ),
        (
            "sampling defaults (generation_config.json)",
            list(info["sampling_defaults"].items()) or [("(none)", "")],
        ),
    ]
    width = max(len(key) for _, rows in sections for key, _ in rows) + 4
    lines: list[str] = []
    for title, rows in sections:
        lines.append(title)
        lines.extend(f"  {key:<{width}}{value}".rstrip() for key, value in rows)
    return "\n".join(lines)


def _add_info(sub: Subparsers) -> None:
    p = sub.add_parser(
        "info",
        help="describe a checkpoint (sizes, parameters, limits, defaults)",
        description="Describe a checkpoint without loading its weights.",
    )
    _add_model_args(p)
    _add_vision_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    info = describe_checkpoint(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# --- eval-demo -------------------------------------------------------------------------------
def _add_eval_demo(sub: Subparsers) -> None:
    p = sub.add_parser(
        "eval-demo",
        help="score a model on held-out demo scenes (per-task accuracy)",
        description="Render held-out block scenes (a seed the training never used) and score the "
        "model's greedy answers per task.",
    )
    _add_model_args(p)
    p.add_argument("--count", type=_positive_int, default=300, metavar="N", help="samples per task")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="held-out stream seed")
    p.add_argument("--tasks", default=None, metavar="T,T", help="comma-separated subset of tasks")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    _add_load_args(p)
    p.set_defaults(func=cmd_eval_demo, min_pixels=None, max_pixels=None)


def cmd_eval_demo(args: argparse.Namespace) -> int:
    from qwenvl.demo.evaluate import EVAL_SEED, evaluate, format_table

    tasks = TASKS if args.tasks is None else tuple(t.strip() for t in args.tasks.split(","))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise QwenVLError(f"unknown task(s) {unknown}; expected some of {list(TASKS)}")
    llm = load_llm(args)
    seed = EVAL_SEED if args.seed is None else args.seed
    result = evaluate(llm, args.count, seed, tasks)
    print(json.dumps(result, indent=2) if args.json else format_table(result, args.count))
    return 0


# --- entry point -----------------------------------------------------------------------------
SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    _add_chat,
    _add_info,
    _add_ground,
    _add_serve,
    _add_train,
    _add_merge_lora,
    _add_eval_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenvl", description="Run Qwen2-VL and Qwen2.5-VL checkpoints."
    )
    parser.add_argument("--version", action="version", version=f"qwenvl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``qwenvl`` command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "model", "") is None:
        if not default_model_path().is_dir():
            print(
                f"error: pass --model: the demo model is not bundled here ({default_model_path()})",
                file=sys.stderr,
            )
            return 2
        args.model = str(default_model_path())
        args.model_name = DEMO_MODEL_NAME
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except QwenVLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
