"""Grounding: parsing a corpus of realistic model answers, coordinate round trips, drawing."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qwenvl.grounding import (
    PALETTE,
    Box,
    Point,
    Quad,
    draw,
    ground,
    grounding_prompt,
    parse_grounding,
    to_norm1000,
    to_original,
    to_resized,
)
from qwenvl.processing.image import ImageGeometry, VisionPreprocessConfig, image_geometry

REF, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX, BOX_END = "<|box_start|>", "<|box_end|>"
QUAD, QUAD_END = "<|quad_start|>", "<|quad_end|>"
FENCE = "```"


def nb(x1, y1, x2, y2, label=None, text=None):
    return Box(x1, y1, x2, y2, label, text, "norm1000")


def rb(x1, y1, x2, y2, label=None, text=None):
    return Box(x1, y1, x2, y2, label, text, "resized")


def rp(x, y, label=None):
    return Point(x, y, label, "resized")


# (id, family, text, expected)
CORPUS: list[tuple[str, str, str, list]] = [
    # ---- Qwen2-VL special tokens (norm1000) ------------------------------------------------
    (
        "v2-single",
        "qwen2_vl",
        f"{REF}the dog{REF_END}{BOX}(69,306),(250,988){BOX_END}",
        [nb(69, 306, 250, 988, "the dog")],
    ),
    (
        "v2-eos-and-prose",
        "qwen2_vl",
        f"Sure. {REF}a red car{REF_END}{BOX}(10,20),(300,400){BOX_END}<|im_end|>",
        [nb(10, 20, 300, 400, "a red car")],
    ),
    (
        "v2-ref-several-boxes",
        "qwen2_vl",
        f"{REF}person{REF_END}{BOX}(1,2),(3,4){BOX_END}{BOX}(5,6),(7,8){BOX_END}",
        [nb(1, 2, 3, 4, "person"), nb(5, 6, 7, 8, "person")],
    ),
    (
        "v2-multiple-refs",
        "qwen2_vl",
        f"{REF}cat{REF_END}{BOX}(100,100),(200,200){BOX_END} and "
        f"{REF}dog{REF_END}{BOX}(300,300),(400,450){BOX_END}",
        [nb(100, 100, 200, 200, "cat"), nb(300, 300, 400, 450, "dog")],
    ),
    (
        "v2-box-without-ref",
        "qwen2_vl",
        f"{BOX}(0,0),(999,999){BOX_END}",
        [nb(0, 0, 999, 999)],
    ),
    (
        "v2-spaces-in-coords",
        "qwen2_vl",
        f"{REF}cup{REF_END}{BOX}( 12 , 34 ), ( 56 , 78 ){BOX_END}",
        [nb(12, 34, 56, 78, "cup")],
    ),
    (
        "v2-swapped-corners",
        "qwen2_vl",
        f"{REF}sign{REF_END}{BOX}(500,600),(100,200){BOX_END}",
        [nb(100, 200, 500, 600, "sign")],
    ),
    (
        "v2-quad",
        "qwen2_vl",
        f"{REF}STOP{REF_END}{QUAD}(10,20),(110,25),(105,80),(8,75){QUAD_END}",
        [Quad(((10, 20), (110, 25), (105, 80), (8, 75)), "STOP", "norm1000")],
    ),
    (
        "v2-malformed-box-skipped",
        "qwen2_vl",
        f"{REF}a{REF_END}{BOX}(10,20),(30){BOX_END}{REF}b{REF_END}{BOX}(1,2),(3,4){BOX_END}",
        [nb(1, 2, 3, 4, "b")],
    ),
    (
        "v2-truncated-box",
        "qwen2_vl",
        f"{REF}a{REF_END}{BOX}(10,20),(30,40){BOX_END}{REF}b{REF_END}{BOX}(1,2),(3",
        [nb(10, 20, 30, 40, "a")],
    ),
    (
        "v2-two-boxes-in-one-span",
        "qwen2_vl",
        f"{REF}eyes{REF_END}{BOX}(1,2),(3,4),(5,6),(7,8){BOX_END}",
        [nb(1, 2, 3, 4, "eyes"), nb(5, 6, 7, 8, "eyes")],
    ),
    (
        "v2-no-grounding",
        "qwen2_vl",
        "There is a dog sitting on a couch.",
        [],
    ),
    # ---- Qwen2.5-VL JSON (resized pixels) --------------------------------------------------
    (
        "v25-fenced-list",
        "qwen2_5_vl",
        f'{FENCE}json\n[\n\t{{"bbox_2d": [135, 114, 1016, 672], "label": "cat"}}\n]\n{FENCE}',
        [rb(135, 114, 1016, 672, "cat")],
    ),
    (
        "v25-fenced-list-many",
        "qwen2_5_vl",
        f"{FENCE}json\n[\n"
        '  {"bbox_2d": [10, 20, 30, 40], "label": "small cake"},\n'
        '  {"bbox_2d": [50, 60, 70, 80], "label": "small cake"},\n'
        '  {"bbox_2d": [90, 100, 110, 120], "label": "big cake"}\n'
        f"]\n{FENCE}",
        [
            rb(10, 20, 30, 40, "small cake"),
            rb(50, 60, 70, 80, "small cake"),
            rb(90, 100, 110, 120, "big cake"),
        ],
    ),
    (
        "v25-bare-list",
        "qwen2_5_vl",
        '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "b"}]',
        [rb(1, 2, 3, 4, "a"), rb(5, 6, 7, 8, "b")],
    ),
    (
        "v25-single-object-fenced",
        "qwen2_5_vl",
        f'{FENCE}json\n{{"bbox_2d": [200, 300, 400, 500], "label": "top right brown cake"}}\n'
        f"{FENCE}",
        [rb(200, 300, 400, 500, "top right brown cake")],
    ),
    (
        "v25-single-object-bare",
        "qwen2_5_vl",
        '{"bbox_2d": [7, 8, 9, 10], "label": "x"}',
        [rb(7, 8, 9, 10, "x")],
    ),
    (
        "v25-prose-around",
        "qwen2_5_vl",
        "Here is the location of the dog:\n"
        f'{FENCE}json\n[{{"bbox_2d": [11, 22, 33, 44], "label": "dog"}}]\n{FENCE}\n'
        "Let me know if you need anything else.",
        [rb(11, 22, 33, 44, "dog")],
    ),
    (
        "v25-prose-bare-json",
        "qwen2_5_vl",
        'The cup is at [{"bbox_2d": [5, 6, 50, 60], "label": "cup"}] in the image.',
        [rb(5, 6, 50, 60, "cup")],
    ),
    (
        "v25-trailing-commas",
        "qwen2_5_vl",
        f'{FENCE}json\n[\n  {{"bbox_2d": [1, 2, 3, 4,], "label": "a",}},\n]\n{FENCE}',
        [rb(1, 2, 3, 4, "a")],
    ),
    (
        "v25-single-quotes",
        "qwen2_5_vl",
        "[{'bbox_2d': [1, 2, 3, 4], 'label': 'a'}]",
        [rb(1, 2, 3, 4, "a")],
    ),
    (
        "v25-truncated-list",
        "qwen2_5_vl",
        f"{FENCE}json\n[\n"
        '  {"bbox_2d": [1, 2, 3, 4], "label": "a"},\n'
        '  {"bbox_2d": [5, 6, 7, 8], "label": "b"},\n'
        '  {"bbox_2d": [9, 10, 1',
        [rb(1, 2, 3, 4, "a"), rb(5, 6, 7, 8, "b")],
    ),
    (
        "v25-truncated-in-label",
        "qwen2_5_vl",
        '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "unfin',
        [rb(1, 2, 3, 4, "a")],
    ),
    (
        "v25-malformed-entries-skipped",
        "qwen2_5_vl",
        "[\n"
        '  {"bbox_2d": [1, 2, 3], "label": "three numbers"},\n'
        '  {"bbox_2d": ["a", 2, 3, 4], "label": "text"},\n'
        '  {"bbox_2d": [1, 2, 3, 4, 5], "label": "five"},\n'
        '  {"bbox_2d": null, "label": "null"},\n'
        '  {"point_2d": [1], "label": "short point"},\n'
        '  {"label": "no coordinates"},\n'
        '  {"bbox_2d": [10, 20, 30, 40], "label": "ok"}\n'
        "]",
        [rb(10, 20, 30, 40, "ok")],
    ),
    (
        "v25-float-coords-and-swapped",
        "qwen2_5_vl",
        '[{"bbox_2d": [30.5, 40.25, 10, 20], "label": "f"}]',
        [rb(10, 20, 30.5, 40.25, "f")],
    ),
    (
        "v25-points",
        "qwen2_5_vl",
        f"{FENCE}json\n[\n"
        '  {"point_2d": [120, 340], "label": "person"},\n'
        '  {"point_2d": [500, 60], "label": "person"}\n'
        f"]\n{FENCE}",
        [rp(120, 340, "person"), rp(500, 60, "person")],
    ),
    (
        "v25-ocr-text-content",
        "qwen2_5_vl",
        f"{FENCE}json\n[\n"
        '  {"bbox_2d": [10, 10, 100, 30], "text_content": "OPEN"},\n'
        '  {"bbox_2d": [10, 40, 200, 60], "text_content": "24 hours"}\n'
        f"]\n{FENCE}",
        [rb(10, 10, 100, 30, None, "OPEN"), rb(10, 40, 200, 60, None, "24 hours")],
    ),
    (
        "v25-ocr-label-and-text",
        "qwen2_5_vl",
        '[{"bbox_2d": [1, 2, 3, 4], "label": "title", "text_content": "Hello"}]',
        [rb(1, 2, 3, 4, "title", "Hello")],
    ),
    (
        "v25-mixed-box-point",
        "qwen2_5_vl",
        '[{"bbox_2d": [1, 2, 3, 4], "label": "car"}, {"point_2d": [9, 8], "label": "wheel"}]',
        [rb(1, 2, 3, 4, "car"), rp(9, 8, "wheel")],
    ),
    (
        "v25-wrapper-object",
        "qwen2_5_vl",
        '{"objects": [{"bbox_2d": [1, 2, 3, 4], "label": "a"}]}',
        [rb(1, 2, 3, 4, "a")],
    ),
    (
        "v25-truncated-wrapper",
        "qwen2_5_vl",
        '{"objects": [{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5',
        [rb(1, 2, 3, 4, "a")],
    ),
    (
        "v25-two-fences",
        "qwen2_5_vl",
        f'{FENCE}json\n[{{"bbox_2d": [1, 2, 3, 4], "label": "a"}}]\n{FENCE}\nand\n'
        f'{FENCE}json\n[{{"bbox_2d": [5, 6, 7, 8], "label": "b"}}]\n{FENCE}',
        [rb(1, 2, 3, 4, "a"), rb(5, 6, 7, 8, "b")],
    ),
    (
        "v25-fence-without-lang",
        "qwen2_5_vl",
        f'{FENCE}\n[{{"bbox_2d": [1, 2, 3, 4], "label": "a"}}]\n{FENCE}',
        [rb(1, 2, 3, 4, "a")],
    ),
    (
        "v25-brace-in-label",
        "qwen2_5_vl",
        '[{"bbox_2d": [1, 2, 3, 4], "label": "a {weird} } label"}]',
        [rb(1, 2, 3, 4, "a {weird} } label")],
    ),
    (
        "v25-broken-json-only",
        "qwen2_5_vl",
        f'{FENCE}json\n[{{"bbox_2d": [1, 2, "x"}}, {{bbox_2d: }}]\n{FENCE}',
        [],
    ),
    (
        "v25-no-grounding",
        "qwen2_5_vl",
        "I cannot find a giraffe in this image.",
        [],
    ),
    # ---- XML points ------------------------------------------------------------------------
    (
        "xml-multi-points",
        "qwen2_5_vl",
        '<points x1="10.5" y1="20" x2="30" y2="40" alt="birds">birds</points>',
        [rp(10.5, 20, "birds"), rp(30, 40, "birds")],
    ),
    (
        "xml-single-point-no-alt",
        "qwen2_5_vl",
        'The button: <points x1="100" y1="200">submit button</points>',
        [rp(100, 200, "submit button")],
    ),
    (
        "xml-point-tag",
        "qwen2_5_vl",
        '<point x="5" y="6" alt="dot">dot</point>',
        [rp(5, 6, "dot")],
    ),
    (
        "xml-bad-coordinate-skipped",
        "qwen2_5_vl",
        '<points x1="abc" y1="2" x2="3" y2="4" alt="p">p</points>',
        [rp(3, 4, "p")],
    ),
    # ---- cross-family fallback ---------------------------------------------------------------
    (
        "fallback-json-under-qwen2_vl",
        "qwen2_vl",
        '[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]',
        [rb(1, 2, 3, 4, "a")],
    ),
    (
        "fallback-tokens-under-qwen2_5_vl",
        "qwen2_5_vl",
        f"{REF}a{REF_END}{BOX}(1,2),(3,4){BOX_END}",
        [nb(1, 2, 3, 4, "a")],
    ),
]


@pytest.mark.parametrize(
    ("family", "text", "expected"),
    [c[1:] for c in CORPUS],
    ids=[c[0] for c in CORPUS],
)
def test_corpus(family: str, text: str, expected: list) -> None:
    assert parse_grounding(text, family) == expected


def test_corpus_size() -> None:
    assert len(CORPUS) >= 30
    assert len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize(
    "text",
    ["", "{", "[{", "```json", "```json\n[{", "<points", "<|box_start|>", "{{{}}}", "[" * 500],
)
def test_never_raises_on_junk(family: str, text: str) -> None:
    assert parse_grounding(text, family) == []


@given(st.text(alphabet=st.sampled_from(list("{}[]\",:'0123456789 abx_2dl<>|")), max_size=80))
@settings(max_examples=150, deadline=None)
def test_never_raises_fuzz(text: str) -> None:
    for family in ("qwen2_vl", "qwen2_5_vl"):
        for obj in parse_grounding(text, family):
            assert isinstance(obj, (Box, Point, Quad))


def test_bad_family() -> None:
    with pytest.raises(ValueError):
        parse_grounding("x", "qwen3")


# ---- geometry ------------------------------------------------------------------------------

CFG = VisionPreprocessConfig()


def test_ground_qwen2_vl_norm1000() -> None:
    g = image_geometry(2000, 1000, CFG)
    text = f"{REF}dog{REF_END}{BOX}(100,200),(500,1000){BOX_END}"
    assert ground(text, g, "qwen2_vl") == [Box(200, 200, 1000, 1000, "dog", None, "original")]


def test_ground_qwen2_5_vl_resized() -> None:
    g = image_geometry(1000, 500, CFG, max_pixels=250 * 28 * 28)
    assert (g.resized_width, g.resized_height) != (1000, 500)
    text = f'{FENCE}json\n[{{"point_2d": [{g.resized_width / 2}, {g.resized_height}], '
    text += f'"label": "p"}}]\n{FENCE}'
    assert ground(text, g, "qwen2_5_vl") == [Point(500, 500, "p", "original")]


def test_clamped_and_ordered() -> None:
    g = ImageGeometry(100, 50, 112, 56, (1, 4, 8), 8)
    out = to_original(Box(1200, -5, -10, 1500, space="norm1000"), g)
    assert out == Box(0, 0, 100, 50, space="original")
    assert to_resized(Point(-1, 1e6), g) == Point(0, 56, space="resized")
    q = to_norm1000(Quad(((0, 0), (200, 0), (100, 100), (0, 50))), g)
    assert q == Quad(((0, 0), (1000, 0), (1000, 1000), (0, 1000)), space="norm1000")


@st.composite
def geometries(draw_: st.DrawFn) -> ImageGeometry:
    w = draw_(st.integers(28, 4000))
    lo_h, hi_h = max(28, -(-w // 200)), min(4000, w * 200)
    h = draw_(st.integers(lo_h, hi_h))
    min_px = draw_(st.integers(4, 1024)) * 28 * 28
    max_px = draw_(st.integers(min_px // (28 * 28), 16384)) * 28 * 28
    return image_geometry(w, h, CFG, min_pixels=min_px, max_pixels=max_px)


@given(geometries(), st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip(g: ImageGeometry, data: st.DataObject) -> None:
    w, h = g.original_width, g.original_height
    xs = st.floats(0, w, allow_nan=False)
    ys = st.floats(0, h, allow_nan=False)
    x1, x2 = sorted((data.draw(xs), data.draw(xs)))
    y1, y2 = sorted((data.draw(ys), data.draw(ys)))
    box = Box(x1, y1, x2, y2, "b")
    point = Point(data.draw(xs), data.draw(ys), "p")
    for obj in (box, point):
        for there in (to_resized, to_norm1000):
            moved = there(obj, g)
            back = to_original(moved, g)
            assert back.space == "original" and back.label == obj.label
            a = _coords(obj)
            b = _coords(back)
            assert all(abs(u - v) <= 1 for u, v in zip(a, b)), (obj, moved, back)
    # Bounds of the target spaces hold.
    r = to_resized(box, g)
    assert 0 <= r.x1 <= r.x2 <= g.resized_width and 0 <= r.y1 <= r.y2 <= g.resized_height
    n = to_norm1000(box, g)
    assert 0 <= n.x1 <= n.x2 <= 1000 and 0 <= n.y1 <= n.y2 <= 1000
    # Model outputs are integers: rounding in the model's space costs at most half a unit.
    rounded = Point(round(to_resized(point, g).x), round(to_resized(point, g).y), space="resized")
    back = to_original(rounded, g)
    assert abs(back.x - point.x) <= 0.5 * w / g.resized_width + 1e-6
    assert abs(back.y - point.y) <= 0.5 * h / g.resized_height + 1e-6


@given(geometries(), st.floats(-1e5, 1e5), st.floats(-1e5, 1e5))
@settings(max_examples=60, deadline=None)
def test_clamp_property(g: ImageGeometry, x: float, y: float) -> None:
    for space in ("original", "resized", "norm1000"):
        p = to_original(Point(x, y, space=space), g)
        assert 0 <= p.x <= g.original_width and 0 <= p.y <= g.original_height


def _coords(obj: Box | Point) -> tuple[float, ...]:
    if isinstance(obj, Box):
        return (obj.x1, obj.y1, obj.x2, obj.y2)
    return (obj.x, obj.y)


# ---- prompts -------------------------------------------------------------------------------


def test_prompts() -> None:
    assert grounding_prompt("the cat", "qwen2_5_vl") == (
        "Locate the cat in the image, output its bbox coordinates using JSON format."
    )
    assert "point" in grounding_prompt("the cat", "qwen2_5_vl", kind="point")
    assert grounding_prompt("the cat", "qwen2_vl") == (
        f"Detect the bounding box of {REF}the cat{REF_END}"
    )
    with pytest.raises(ValueError):
        grounding_prompt("x", "qwen2_vl", kind="point")
    with pytest.raises(ValueError):
        grounding_prompt("x", "llava")


# ---- drawing -------------------------------------------------------------------------------

WHITE = (255, 255, 255)


def test_draw_box_pixels() -> None:
    img = Image.new("RGB", (400, 300), WHITE)
    before = img.tobytes()
    out = draw(img, [Box(100, 100, 300, 250, "dog")])
    assert img.tobytes() == before and out is not img
    colour = PALETTE[0]
    # The four edges, at their midpoints.
    for xy in [(100, 175), (299, 175), (200, 100), (200, 249)]:
        assert out.getpixel(xy) == colour, xy
    # Well inside and well outside: untouched.
    for xy in [(200, 175), (150, 150), (20, 280), (380, 20), (350, 200)]:
        assert out.getpixel(xy) == WHITE, xy
    # The label tag sits just above the box, in the box colour with white text.
    tag = [out.getpixel((x, 95)) for x in range(100, 115)]
    assert colour in tag


def test_draw_point_quad_and_palette() -> None:
    img = Image.new("RGB", (200, 200), WHITE)
    objs = [
        Point(50, 60, "p"),
        Quad(((120, 120), (180, 120), (180, 180), (120, 180)), "q"),
        Box(10, 150, 60, 190),
    ]
    out = draw(img, objs, width=3)
    assert out.getpixel((50, 60)) == PALETTE[0]
    assert out.getpixel((120, 150)) == PALETTE[1]  # quad's left edge
    assert out.getpixel((150, 150)) == WHITE  # inside the quad
    assert out.getpixel((10, 170)) == PALETTE[2]
    assert img.getpixel((50, 60)) == WHITE


def test_draw_maps_other_spaces() -> None:
    img = Image.new("L", (100, 100), 255)
    g = ImageGeometry(100, 100, 56, 56, (1, 4, 4), 4)
    out = draw(img, [Point(500, 500, space="norm1000"), Point(28, 14, space="resized")], geometry=g)
    assert out.mode == "RGB" and img.mode == "L"
    assert out.getpixel((50, 50)) == PALETTE[0]
    assert out.getpixel((50, 25)) == PALETTE[1]
    with pytest.raises(ValueError):
        draw(img, [Point(1, 1, space="resized")])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_grounding_constraint_always_gives_grounding_something_to_parse(family, llms):
    """A random model (noise when free) constrained to its family's trained form: every reply
    parses into 1..max_objects boxes inside the family's coordinate range."""
    from qwenvl import SamplingParams
    from qwenvl.grounding import grounding_constraint, grounding_prompt, parse_grounding

    llm = llms(family)
    so = grounding_constraint(family, max_objects=3)
    picture = Image.new("RGB", (70, 100), (200, 30, 30))
    text = grounding_prompt("the red box", family)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": picture}, {"type": "text", "text": text}],
        }
    ]
    for seed in range(4):
        params = SamplingParams(
            temperature=1.0, seed=seed, max_tokens=400, skip_special_tokens=False, structured=so
        )
        out = llm.chat(messages, params, special_tokens_in_content=True)[0].outputs[0]
        found = parse_grounding(out.text, family)
        assert out.finish_reason == "stop" and 1 <= len(found) <= 3, out.text
        limit = 1000 if family == "qwen2_vl" else 16384
        for box in found:
            assert 0 <= min(box.x1, box.y1) and max(box.x2, box.y2) <= limit and box.label
