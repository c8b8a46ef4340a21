"""``qwenvl ground``: locate a phrase in an image and print (and draw) the boxes in image pixels.

Registered in :data:`qwenvl.cli.main.SUBCOMMANDS` like every subcommand (``add_ground`` /
``cmd_ground``). The prompt is the model family's own grounding prompt
(:func:`qwenvl.grounding.grounding_prompt`), decoding is greedy, and the answer is parsed in the
family's convention (Qwen2-VL 0..1000 special-token boxes, Qwen2.5-VL JSON in resized pixels) and
mapped to pixels of the original image.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from qwenvl.cli.common import add_load_args, add_model_args, add_vision_args, load_llm, positive_int
from qwenvl.errors import MediaError, PromptError
from qwenvl.grounding import Box, Point, Quad, draw, grounding_prompt
from qwenvl.processing.media import load_image
from qwenvl.sampling import SamplingParams

if TYPE_CHECKING:
    from qwenvl.cli.common import Subparsers
    from qwenvl.outputs import RequestOutput

DEFAULT_GROUND_TOKENS = 256


def _r(v: float) -> float:
    """Pixel values for printing: 2 decimals, integers without a fraction."""
    v = round(float(v), 2)
    return int(v) if v == int(v) else v


def object_to_dict(obj: Box | Point | Quad, default_label: str | None = None) -> dict[str, Any]:
    """One grounded object (original pixels) as the JSON ``qwenvl ground --json`` prints."""
    out: dict[str, Any] = {"label": obj.label or default_label}
    if isinstance(obj, Box):
        out["type"] = "box"
        out["bbox"] = [_r(obj.x1), _r(obj.y1), _r(obj.x2), _r(obj.y2)]
        if obj.text is not None:
            out["text"] = obj.text
    elif isinstance(obj, Point):
        out["type"] = "point"
        out["point"] = [_r(obj.x), _r(obj.y)]
    else:
        out["type"] = "quad"
        out["points"] = [[_r(x), _r(y)] for x, y in obj.points]
    return out


def format_object(d: dict[str, Any]) -> str:
    """One line of the plain output: ``label: box x1 y1 x2 y2`` (pixels of the original image)."""
    label = d["label"] if d["label"] is not None else "(no label)"
    if d["type"] == "box":
        coords = " ".join(str(v) for v in d["bbox"])
    elif d["type"] == "point":
        coords = " ".join(str(v) for v in d["point"])
    else:
        coords = " ".join(f"{x},{y}" for x, y in d["points"])
    return f"{label}: {d['type']} {coords}"


def ground_request(
    llm: Any, image: Any, phrase: str, *, kind: str = "box", max_tokens: int = DEFAULT_GROUND_TOKENS
) -> RequestOutput:
    """Ask ``llm`` to locate ``phrase`` in ``image`` with its family's prompt, greedily.

    Special tokens are kept in the text (Qwen2-VL answers with ``<|box_start|>`` spans).
    """
    try:
        prompt = grounding_prompt(phrase, llm.config.family, kind=kind)  # type: ignore[arg-type]
    except ValueError as e:
        raise PromptError(str(e)) from e
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}],
        }
    ]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=False)
    return llm.chat(messages, params)[0]


def add_ground(sub: Subparsers) -> None:
    p = sub.add_parser(
        "ground",
        help="locate a phrase in an image (boxes in image pixels)",
        description="Ask the model where PHRASE is in the image (greedy, the family's own "
        "grounding prompt) and print each object as 'label: box x1 y1 x2 y2' in pixels of the "
        "original image.",
    )
    add_model_args(p)
    p.add_argument(
        "--image", required=True, metavar="X", help="image path, URL or data URI to search"
    )
    p.add_argument("--out", metavar="PNG", help="save a copy of the image with the objects drawn")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument(
        "--point",
        action="store_true",
        help="ask for a point instead of a box (Qwen2.5-VL only)",
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=DEFAULT_GROUND_TOKENS,
        metavar="N",
        help=f"most tokens in the answer (default {DEFAULT_GROUND_TOKENS})",
    )
    add_load_args(p)
    add_vision_args(p)
    p.add_argument("phrase", help="what to locate, e.g. 'the red car'")
    p.set_defaults(func=cmd_ground)


def cmd_ground(args: argparse.Namespace, stdout: TextIO | None = None) -> int:
    out = stdout if stdout is not None else sys.stdout
    # Read the image first: a bad path fails before the (slow) model load.
    image = load_image(args.image)
    if args.out is not None and not Path(args.out).parent.is_dir():
        raise MediaError(f"cannot write {args.out}: folder {Path(args.out).parent} does not exist")
    llm = load_llm(args)
    result = ground_request(
        llm, image, args.phrase, kind="point" if args.point else "box", max_tokens=args.max_tokens
    )
    objects = result.grounding()
    found = [object_to_dict(o, default_label=args.phrase) for o in objects]
    if args.json:
        out.write(json.dumps(found, ensure_ascii=False) + "\n")
    else:
        if not found:
            text = result.outputs[0].text
            print(f"no objects found; the model answered: {text!r}", file=sys.stderr)
        for d in found:
            out.write(format_object(d) + "\n")
    if args.out is not None:
        try:
            draw(image, objects).save(args.out)
        except (OSError, ValueError) as e:
            raise MediaError(f"cannot write {args.out}: {e}") from e
    return 0
