"""The ``qwenvl`` console script: ``qwenvl {chat,info,...} ...``, thin wrappers over the library.

A subcommand is a pair of functions: ``add_<name>(subparsers)`` declares its arguments and
``cmd_<name>(args) -> int`` turns them into library calls; adding one means writing that pair
(in its own module under :mod:`qwenvl.cli`, importing only :mod:`qwenvl.cli.common` and the
library) and listing ``add_<name>`` in :data:`SUBCOMMANDS`. Every error qwenvl raises on purpose
(:class:`~qwenvl.errors.QwenVLError`) is printed as ``error: <message>`` with exit code 2, Ctrl-C
exits with 1, and argparse usage errors exit with 2 as usual.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TextIO

from qwenvl import __version__
from qwenvl.cli.common import (
    add_load_args,
    add_model_args,
    add_vision_args,
    isatty,
    load_llm,
    positive_float,
    positive_int,
    print_error,
)
from qwenvl.cli.ground import add_ground
from qwenvl.cli.info import add_info
from qwenvl.cli.quantize import add_quantize
from qwenvl.cli.serve import add_serve
from qwenvl.cli.train import add_merge_lora, add_train
from qwenvl.demo import DEMO_MODEL_NAME, default_model_path
from qwenvl.demo.tasks import EVAL_TASKS
from qwenvl.errors import QwenVLError
from qwenvl.llm import LLM, Messages
from qwenvl.models import family_of
from qwenvl.sampling import SamplingParams

if TYPE_CHECKING:
    from qwenvl.cli.common import Subparsers

# Used when neither --max-tokens nor the checkpoint's generation_config sets a limit: the library
# default (16, vLLM's) cuts chat replies short, and "up to the context" sizes the KV cache for it.
DEFAULT_MAX_TOKENS = 1024
SAMPLING_ARGS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
CHAT_HELP = "commands: /image PATH, /video PATH (attach to the next turn), /reset, /help, /exit"


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


@dataclass
class ChatState:
    """An interactive chat so far: its turns, and the media waiting for the next user turn."""

    history: Messages = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)


def chat_command(
    text: str, state: ChatState, note: Callable[[str], None], stderr: TextIO
) -> Literal["exit", "done", "message"]:
    """Carry out ``text`` if it is a chat command: ``exit`` ends the chat, ``done`` reads the
    next line, ``message`` means ``text`` is no command but the user's next message."""
    command, _, rest = text.partition(" ")
    if command in ("/exit", "/quit"):
        return "exit"
    if command == "/reset":
        state.history.clear()
        state.images.clear()
        state.videos.clear()
        note("history cleared")
    elif command in ("/image", "/video"):
        kind = command[1:]
        queue = state.images if kind == "image" else state.videos
        if rest.strip():
            queue.append(rest.strip())
            note(f"{len(queue)} {kind}(s) will go with the next message")
        else:
            stderr.write(f"usage: {command} PATH\n")
    elif command == "/help":
        note(CHAT_HELP)
    else:
        return "message"
    return "done"


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
    tty = isatty(stdin)

    def note(text: str) -> None:
        if tty:
            stderr.write(text + "\n")
            stderr.flush()

    note(f"{family_of(llm.config).display_name} chat; {CHAT_HELP}")
    state = ChatState(images=list(images), videos=list(videos))
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
        action = chat_command(text, state, note, stderr)
        if action == "exit":
            return 0
        if action == "done":
            continue
        turn = user_message(text, state.images, state.videos, video_options)
        state.images, state.videos = [], []
        try:
            reply = stream_reply(llm, [*system, *state.history, turn], params, stdout)
        except QwenVLError as e:  # a bad image or an over-long prompt ends this turn, not the chat
            stderr.write(f"error: {e}\n")
            stderr.flush()
            continue
        state.history += [turn, {"role": "assistant", "content": reply}]


def add_chat(sub: Subparsers) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model (one-shot with a prompt, interactive without)",
        description="With PROMPT: stream one reply and exit. Without: an interactive chat "
        f"reading lines from stdin ({CHAT_HELP}). PROMPT '-' reads the prompt from stdin.",
    )
    add_model_args(p)
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
    p.add_argument("--fps", type=positive_float, metavar="F", help="video frames sampled a second")
    p.add_argument(
        "--max-video-tokens",
        type=positive_int,
        metavar="N",
        help="token budget of each video: smaller frames, then fewer frames, to fit",
    )
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    _add_sampling_args(p)
    add_load_args(p)
    add_vision_args(p)
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


# --- eval-demo -------------------------------------------------------------------------------
def add_eval_demo(sub: Subparsers) -> None:
    p = sub.add_parser(
        "eval-demo",
        help="score a model on held-out demo scenes (per-task accuracy)",
        description="Render held-out block scenes (a seed the training never used) and score the "
        "model's greedy answers per task.",
    )
    add_model_args(p)
    p.add_argument("--count", type=positive_int, default=300, metavar="N", help="samples per task")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="held-out stream seed")
    p.add_argument("--tasks", default=None, metavar="T,T", help="comma-separated subset of tasks")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    add_load_args(p)
    p.set_defaults(func=cmd_eval_demo, min_pixels=None, max_pixels=None)


def cmd_eval_demo(args: argparse.Namespace) -> int:
    from qwenvl.demo.evaluate import EVAL_SEED, evaluate, format_table

    tasks = EVAL_TASKS if args.tasks is None else tuple(t.strip() for t in args.tasks.split(","))
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown:
        raise QwenVLError(f"unknown task(s) {unknown}; expected some of {list(EVAL_TASKS)}")
    llm = load_llm(args)
    seed = EVAL_SEED if args.seed is None else args.seed
    result = evaluate(llm, args.count, seed, tasks)
    print(json.dumps(result, indent=2) if args.json else format_table(result, args.count))
    return 0


# --- entry point -----------------------------------------------------------------------------
SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    add_chat,
    add_info,
    add_ground,
    add_serve,
    add_train,
    add_merge_lora,
    add_eval_demo,
    add_quantize,
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
            return print_error(
                f"pass --model: the demo model is not bundled here ({default_model_path()})"
            )
        args.model = str(default_model_path())
        args.model_name = DEMO_MODEL_NAME
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except QwenVLError as e:
        return print_error(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
