"""Grounding: parse boxes / points / quads out of model text, map them between coordinate spaces,
and draw them on the image.

Each family declares the convention its model answers in (``ModelFamily.grounding``); two exist:

* ``"norm1000"`` (**Qwen2-VL**) writes special-token spans,
  ``<|object_ref_start|>dog<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``, and
  ``<|quad_start|>(x1,y1),...,(x4,y4)<|quad_end|>`` for quadrilaterals, with integer coordinates
  normalised to 0..1000 of the image (space ``"norm1000"``). A ref labels every box that follows
  it until the next ref; boxes before any ref have ``label=None``.
* ``"resized"`` (**Qwen2.5-VL**) writes JSON (usually in a ```json fence): a list or a single
  object with ``bbox_2d: [x1, y1, x2, y2]`` or ``point_2d: [x, y]`` and ``label`` (or
  ``text_content`` for OCR spotting), in pixels of the *resized* image the model saw (space
  ``"resized"``); points can also come as XML
  ``<points x1=".." y1=".." x2=.. y2=.. alt="..">phrase</points>``.

Parsing never raises on model output: prose around the JSON, trailing commas, single quotes,
truncated lists (the complete objects before the cut are kept) and malformed entries (wrong arity,
non-numeric values) are tolerated; what cannot be read is skipped. ``ground`` parses and maps to
original-image pixels in one call; ``draw`` annotates a copy of the original image.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont

from qwenvl.errors import ConfigError
from qwenvl.models import get_family, supported
from qwenvl.models.interface import GroundingStyle
from qwenvl.processing.image import ImageGeometry
from qwenvl.structured import StructuredOutput

__all__ = [
    "Box",
    "Point",
    "Quad",
    "Space",
    "convert",
    "draw",
    "ground",
    "grounding_constraint",
    "grounding_prompt",
    "grounding_style",
    "parse_grounding",
    "to_norm1000",
    "to_original",
    "to_resized",
]

Space = Literal["norm1000", "resized", "original"]
_SPACES = ("norm1000", "resized", "original")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box; ``text`` holds OCR ``text_content`` (Qwen2.5-VL spotting)."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    text: str | None = None
    space: Space = "original"


@dataclass(frozen=True)
class Point:
    """A point, e.g. from ``point_2d`` or XML ``<points>``."""

    x: float
    y: float
    label: str | None = None
    space: Space = "original"


@dataclass(frozen=True)
class Quad:
    """A quadrilateral: four ``(x, y)`` corners in the order the model gave them."""

    points: tuple[tuple[float, float], ...]
    label: str | None = None
    space: Space = "original"


Grounded = Box | Point | Quad


# ---------------------------------------------------------------------------------------------
# Parsing


def grounding_style(family: str) -> GroundingStyle:
    """The coordinate convention a family's model writes (its ``ModelFamily.grounding``):
    ``"norm1000"`` boxes in special tokens, or ``"resized"`` JSON in resized-image pixels."""
    try:
        return get_family(family).grounding
    except ConfigError:
        raise ValueError(f"family must be one of {supported()}, got {family!r}") from None


def parse_grounding(text: str, family: str) -> list[Box | Point | Quad]:
    """Every box, point and quad in a model answer, in the space the format implies.

    Args:
        text: the generated text (special tokens kept for Qwen2-VL boxes).
        family: the model's ``model_type`` (``"qwen2_vl"``, ``"qwen2_5_vl"``...); its own
            convention (:func:`grounding_style`) is tried first and, when it yields nothing,
            the other one.

    Returns:
        Objects in text order: special-token spans as ``space="norm1000"``, JSON / XML as
        ``space="resized"``. Never raises on odd model output (only on a bad ``family``).
    """
    style = grounding_style(family)
    if not isinstance(text, str) or not text:
        return []
    if style == "norm1000":
        found = _parse_special_tokens(text)
        return found or _parse_json_and_xml(text)
    found = _parse_json_and_xml(text)
    return found or _parse_special_tokens(text)


_TOKEN_RE = re.compile(
    r"<\|object_ref_start\|>(?P<ref>.*?)<\|object_ref_end\|>"
    r"|<\|box_start\|>(?P<box>.*?)<\|box_end\|>"
    r"|<\|quad_start\|>(?P<quad>.*?)<\|quad_end\|>",
    re.DOTALL,
)
_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _numbers(s: str) -> list[float]:
    out = []
    for m in _NUMBER_RE.findall(s):
        v = float(m)
        if math.isfinite(v):
            out.append(v)
    return out


def _parse_special_tokens(text: str) -> list[Box | Point | Quad]:
    out: list[Box | Point | Quad] = []
    label: str | None = None
    for m in _TOKEN_RE.finditer(text):
        if m.group("ref") is not None:
            label = m.group("ref").strip() or None
        elif m.group("box") is not None:
            nums = _numbers(m.group("box"))
            # One box per span; a span holding several boxes (multiple of 4) is split.
            if nums and len(nums) % 4 == 0:
                for i in range(0, len(nums), 4):
                    x1, y1, x2, y2 = nums[i : i + 4]
                    out.append(_box(x1, y1, x2, y2, label, None, "norm1000"))
        else:
            nums = _numbers(m.group("quad"))
            if len(nums) == 8:
                pts = tuple((nums[i], nums[i + 1]) for i in range(0, 8, 2))
                out.append(Quad(pts, label=label, space="norm1000"))
    return out


def _box(
    x1: float, y1: float, x2: float, y2: float, label: str | None, text: str | None, space: Space
) -> Box:
    return Box(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), label, text, space)


# -- JSON (Qwen2.5-VL) ------------------------------------------------------------------------

_TRAILING_COMMA_RE = re.compile(r",\s*([\]}])")


def _load_object(s: str) -> Any:
    """``json.loads`` with trailing commas and Python-literal (single-quoted) fallbacks."""
    cleaned = _TRAILING_COMMA_RE.sub(r"\1", s)
    try:
        return json.loads(cleaned)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(cleaned)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _matching_brace(s: str, start: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``start`` (strings respected), or -1."""
    depth = 0
    quote: str | None = None
    i = start
    n = len(s)
    while i < n:
        c = s[i]
        if quote is not None:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _json_objects(text: str) -> Iterator[Any]:
    """Each outermost parseable ``{...}`` in ``text``; an unclosed or unparseable one is
    skipped by one character so the complete objects nested inside (a truncated list wrapped
    in an object, say) are still found."""
    i = text.find("{")
    while i != -1:
        end = _matching_brace(text, i)
        value = _load_object(text[i : end + 1]) if end != -1 else None
        if isinstance(value, dict):
            yield value
            i = text.find("{", end + 1)
        else:
            i = text.find("{", i + 1)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _str_or_none(v: object) -> str | None:
    if v is None or isinstance(v, (dict, list)):
        return None
    s = str(v).strip()
    return s or None


def _from_dict(d: dict[str, Any]) -> list[Box | Point | Quad]:
    box = d.get("bbox_2d", d.get("bbox"))
    point = d.get("point_2d", d.get("point"))
    label = _str_or_none(d.get("label"))
    text = _str_or_none(d.get("text_content"))
    if box is not None:
        if isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_num(v) for v in box):
            return [_box(*map(float, box), label, text, "resized")]
        return []
    if point is not None:
        if isinstance(point, (list, tuple)) and len(point) == 2 and all(_is_num(v) for v in point):
            return [Point(float(point[0]), float(point[1]), label or text, "resized")]
        return []
    # A wrapper such as {"objects": [...]}: look inside.
    out: list[Box | Point | Quad] = []
    for value in d.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                out.extend(_from_dict(item))
    return out


_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)


def _parse_json(text: str) -> list[Box | Point | Quad]:
    out: list[Box | Point | Quad] = []
    for obj in _json_objects(text):
        out.extend(_from_dict(obj))
    return out


# -- XML points -------------------------------------------------------------------------------

_XML_RE = re.compile(r"<points?\b([^<>]*?)/?>(?:(.*?)</points?>)?", re.DOTALL)
_ATTR_RE = re.compile(r"([A-Za-z_][\w-]*)\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s\"'>/]+))")


def _parse_xml(text: str) -> list[Box | Point | Quad]:
    out: list[Box | Point | Quad] = []
    for m in _XML_RE.finditer(text):
        attrs = {k.lower(): a or b or c for k, a, b, c in _ATTR_RE.findall(m.group(1))}
        label = _str_or_none(attrs.get("alt")) or _str_or_none(m.group(2))
        pairs: list[tuple[str | None, str | None]] = []
        if "x" in attrs or "y" in attrs:
            pairs.append((attrs.get("x"), attrs.get("y")))
        k = 1
        while f"x{k}" in attrs or f"y{k}" in attrs:
            pairs.append((attrs.get(f"x{k}"), attrs.get(f"y{k}")))
            k += 1
        for xs, ys in pairs:
            x, y = _to_float(xs), _to_float(ys)
            if x is not None and y is not None:
                out.append(Point(x, y, label, "resized"))
    return out


def _to_float(s: str | None) -> float | None:
    if s is None:
        return None
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _parse_json_and_xml(text: str) -> list[Box | Point | Quad]:
    fenced = [m.group(1) for m in _FENCE_RE.finditer(text)]
    found: list[Box | Point | Quad] = []
    for block in fenced:
        found.extend(_parse_json(block))
    if not found:
        found = _parse_json(text)
    return found + _parse_xml(text)


# ---------------------------------------------------------------------------------------------
# Coordinate spaces


def _extent(space: str, g: ImageGeometry) -> tuple[float, float]:
    """Width and height of the image in ``space`` units."""
    if space == "norm1000":
        return 1000.0, 1000.0
    if space == "resized":
        return float(g.resized_width), float(g.resized_height)
    if space == "original":
        return float(g.original_width), float(g.original_height)
    raise ValueError(f"space must be one of {_SPACES}, got {space!r}")


def convert(obj: Grounded, geometry: ImageGeometry, space: Space) -> Grounded:
    """``obj`` mapped into ``space``, clamped to the image, box corners ordered.

    ``norm1000`` maps through the original size (``x / 1000 * W``); ``resized`` through the
    resized size (``x / resized_width * W``).
    """
    sw, sh = _extent(obj.space, geometry)
    tw, th = _extent(space, geometry)
    fx, fy = tw / sw, th / sh

    def mx(x: float) -> float:
        return min(max(x * fx, 0.0), tw)

    def my(y: float) -> float:
        return min(max(y * fy, 0.0), th)

    if isinstance(obj, Box):
        return _box(mx(obj.x1), my(obj.y1), mx(obj.x2), my(obj.y2), obj.label, obj.text, space)
    if isinstance(obj, Point):
        return replace(obj, x=mx(obj.x), y=my(obj.y), space=space)
    if isinstance(obj, Quad):
        return replace(obj, points=tuple((mx(x), my(y)) for x, y in obj.points), space=space)
    raise TypeError(f"expected Box, Point or Quad, got {type(obj).__name__}")


def to_original(obj: Grounded, geometry: ImageGeometry) -> Grounded:
    """``obj`` in original-image pixels."""
    return convert(obj, geometry, "original")


def to_resized(obj: Grounded, geometry: ImageGeometry) -> Grounded:
    """``obj`` in pixels of the resized image the model saw (Qwen2.5-VL's space)."""
    return convert(obj, geometry, "resized")


def to_norm1000(obj: Grounded, geometry: ImageGeometry) -> Grounded:
    """``obj`` on the 0..1000 normalised scale (Qwen2-VL's space)."""
    return convert(obj, geometry, "norm1000")


def ground(text: str, geometry: ImageGeometry, family: str) -> list[Box | Point | Quad]:
    """Parse ``text`` and return every object in original-image pixels."""
    return [to_original(o, geometry) for o in parse_grounding(text, family)]


# ---------------------------------------------------------------------------------------------
# Prompts


def grounding_prompt(phrase: str, family: str, *, kind: Literal["box", "point"] = "box") -> str:
    """A prompt that asks ``family`` to ground ``phrase`` in its own output convention.

    Qwen2-VL: ``"Detect the bounding box of <|object_ref_start|>{phrase}<|object_ref_end|>"``
    (the ref-token form of the Qwen2-VL README, which cues the ref + box-token answer; the
    tokenizer must parse special tokens in user text). It has no point format, so ``kind`` must
    be ``"box"``. Qwen2.5-VL: the cookbook's ``"Locate {phrase} in the image, output its bbox
    coordinates using JSON format."`` (or its point coordinates for ``kind="point"``).
    """
    style = grounding_style(family)
    if kind not in ("box", "point"):
        raise ValueError(f"kind must be 'box' or 'point', got {kind!r}")
    if style == "norm1000":
        if kind != "box":
            raise ValueError("Qwen2-VL grounding only outputs boxes (kind='box')")
        return f"Detect the bounding box of <|object_ref_start|>{phrase}<|object_ref_end|>"
    what = "bbox" if kind == "box" else "point"
    return f"Locate {phrase} in the image, output its {what} coordinates using JSON format."


def grounding_constraint(
    family: str, *, kind: Literal["box", "point"] = "box", max_objects: int = 8
) -> StructuredOutput:
    """What a grounding answer must look like, in ``family``'s own trained form, as a sampling
    constraint (``SamplingParams(structured=...)``): with it, :func:`parse_grounding` always
    finds 1 to ``max_objects`` objects.

    Qwen2.5-VL (``resized``): the cookbook's JSON list ``[{"bbox_2d": [x1, y1, x2, y2],
    "label": ...}]`` (``point_2d`` for points) in whole resized-image pixels. Qwen2-VL
    (``norm1000``): ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)
    <|box_end|>`` spans on the 0..1000 grid, through a grammar (the spans are special tokens).
    """
    style = grounding_style(family)
    if kind not in ("box", "point") or (style == "norm1000" and kind != "box"):
        raise ValueError(f"{family} grounding cannot output kind={kind!r}")
    if not 1 <= max_objects <= 64:
        raise ValueError("max_objects must be in 1..64")
    if style == "norm1000":
        num = "/(1000|[1-9][0-9]{0,2}|0)/"
        obj = (
            "<|object_ref_start|> LABEL <|object_ref_end|> <|box_start|> "
            f'"(" {num} "," {num} ")" "," "(" {num} "," {num} ")" <|box_end|>'
        )
        lark = f"start: obj obj~0..{max_objects - 1}\nobj: {obj}\nLABEL: /[^<>\\n]{{1,40}}/"
        return StructuredOutput(grammar=lark)
    coord = {"type": "integer", "minimum": 0, "maximum": 16384}
    key, n = ("bbox_2d", 4) if kind == "box" else ("point_2d", 2)
    item = {
        "type": "object",
        "properties": {
            key: {"type": "array", "items": coord, "minItems": n, "maxItems": n},
            "label": {"type": "string", "minLength": 1, "maxLength": 40},
        },
        "required": [key, "label"],
        "additionalProperties": False,
    }
    return StructuredOutput(
        json_schema={"type": "array", "items": item, "minItems": 1, "maxItems": max_objects}
    )


# ---------------------------------------------------------------------------------------------
# Drawing

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (0, 130, 200),  # blue
    (60, 160, 60),  # green
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (0, 150, 150),  # teal
    (240, 50, 230),  # magenta
    (128, 96, 0),  # olive-brown
    (0, 0, 128),  # navy
    (170, 110, 40),  # brown
)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _label_text(obj: Grounded) -> str | None:
    if isinstance(obj, Box):
        return obj.label or obj.text
    return obj.label


def draw(
    image: Image.Image,
    objects: Iterable[Grounded],
    *,
    width: int | None = None,
    geometry: ImageGeometry | None = None,
) -> Image.Image:
    """An annotated copy of ``image`` (the original; it is not modified).

    Boxes are rectangles, points filled circles, quads polygons, one palette colour per object,
    with the label (or OCR text) in white on a filled tag. Objects not in ``"original"`` space
    are mapped first: ``norm1000`` needs only the image size, ``resized`` needs ``geometry``.

    Args:
        image: the original image.
        objects: from ``ground`` (original pixels) or ``parse_grounding`` (with ``geometry``).
        width: line width in pixels; default scales with the image (about 0.4% of its long side).
        geometry: the image's ``ImageGeometry``, for objects in ``"resized"`` space.
    """
    out = image.copy() if image.mode in ("RGB", "RGBA") else image.convert("RGB")
    w_img, h_img = out.size
    if geometry is None:
        geometry = ImageGeometry(w_img, h_img, w_img, h_img, (1, 1, 1), 0)
        has_resized = False
    else:
        has_resized = True
    lw = width if width is not None else max(2, round(0.004 * max(w_img, h_img)))
    lw = max(1, int(lw))
    font = _font(max(10, min(48, round(max(w_img, h_img) / 50))))
    canvas = ImageDraw.Draw(out)

    def px(x: float, y: float) -> tuple[int, int]:
        return min(max(round(x), 0), w_img - 1), min(max(round(y), 0), h_img - 1)

    for i, obj in enumerate(objects):
        if obj.space == "resized" and not has_resized:
            raise ValueError("objects in 'resized' space need the image geometry to be drawn")
        obj = to_original(obj, geometry)
        colour = PALETTE[i % len(PALETTE)]
        if isinstance(obj, Box):
            x1, y1 = px(obj.x1, obj.y1)
            # Box edges are pixel boundaries: the last covered pixel is x2 - 1.
            x2, y2 = px(max(obj.x2 - 1, obj.x1), max(obj.y2 - 1, obj.y1))
            canvas.rectangle((x1, y1, x2, y2), outline=colour, width=lw)
            anchor = (x1, y1)
        elif isinstance(obj, Point):
            cx, cy = px(obj.x, obj.y)
            r = max(3, 2 * lw)
            canvas.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=(255, 255, 255))
            anchor = (cx + r, cy - r)
        else:
            pts = [px(x, y) for x, y in obj.points]
            canvas.polygon(pts, outline=colour, width=lw)
            anchor = min(pts, key=lambda p: (p[1], p[0]))
        label = _label_text(obj)
        if label:
            _draw_label(canvas, label, anchor, colour, font, (w_img, h_img))
    return out


def _draw_label(
    canvas: ImageDraw.ImageDraw,
    label: str,
    anchor: tuple[int, int],
    colour: tuple[int, int, int],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    size: tuple[int, int],
) -> None:
    """``label`` on a filled tag just above ``anchor`` (below it when there is no room)."""
    left, t, r, b = canvas.textbbox((0, 0), label, font=font)
    tw, th = r - left, b - t
    pad = max(1, th // 4)
    x, y = anchor
    top = y - th - 2 * pad
    if top < 0:
        top = y
    x = min(max(x, 0), max(0, size[0] - tw - 2 * pad))
    canvas.rectangle((x, top, x + tw + 2 * pad, top + th + 2 * pad), fill=colour)
    canvas.text((x + pad - left, top + pad - t), label, fill=(255, 255, 255), font=font)
