"""``qwenvl ground``: prompt, parsing and coordinate mapping end to end (fixed model output), the
JSON output, the annotated image, errors, and a run of the real tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fixed_output import fix_output_text
from qwenvl.cli.ground import ground_request
from qwenvl.cli.main import main
from qwenvl.grounding import PALETTE, grounding_prompt

# Qwen2-VL: a 0..1000 special-token box; on an 840x560 image (100,200),(500,750) is
# x 100/1000*840 = 84 .. 500/1000*840 = 420, y 200/1000*560 = 112 .. 750/1000*560 = 420.
V2_REPLY = (
    "<|object_ref_start|>the red car<|object_ref_end|><|box_start|>(100,200),(500,750)<|box_end|>"
)
V2_SIZE = (840, 560)
V2_BOX = [84, 112, 420, 420]
# Qwen2.5-VL: JSON in pixels of the resized image. 1001x333 resizes to 1008x336 (28-multiples),
# so [252, 84, 756, 252] is x 252/1008*1001 = 250.25 .. 756/1008*1001 = 750.75,
# y 84/336*333 = 83.25 .. 252/336*333 = 249.75.
V25_REPLY = '```json\n[{"bbox_2d": [252, 84, 756, 252], "label": "red car"}]\n```'
V25_SIZE = (1001, 333)
V25_BOX = [250.25, 83.25, 750.75, 249.75]

CASES = {
    "qwen2_vl": (V2_REPLY, V2_SIZE, V2_BOX, "the red car"),
    "qwen2_5_vl": (V25_REPLY, V25_SIZE, V25_BOX, "red car"),
}


def grey_png(tmp_path: Path, size: tuple[int, int]) -> Path:
    path = tmp_path / f"scene_{size[0]}x{size[1]}.png"
    Image.new("RGB", size, (128, 128, 128)).save(path)
    return path


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_ground_prints_original_pixels(family, checkpoints, tmp_path, capsys, monkeypatch):
    reply, size, box, label = CASES[family]
    ckpt = checkpoints(family)
    image = grey_png(tmp_path, size)
    fix_output_text(monkeypatch, reply)
    capsys.readouterr()
    args = ["ground", "--model", str(ckpt), "--image", str(image), "--max-tokens", "2"]
    out_png = tmp_path / "annotated.png"
    assert main([*args, "--out", str(out_png), "the red car"]) == 0
    printed = capsys.readouterr().out
    assert printed == f"{label}: box {' '.join(str(v) for v in box)}\n"

    assert main([*args, "--json", "the red car"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found == [{"label": label, "type": "box", "bbox": box}]

    annotated = Image.open(out_png).convert("RGB")
    assert annotated.size == size
    x_left = round(box[0])
    y_mid = round((box[1] + box[3]) / 2)
    assert annotated.getpixel((x_left, y_mid)) == PALETTE[0]  # on the left edge
    assert annotated.getpixel((x_left - 3, y_mid)) == (128, 128, 128)  # just outside it
    assert annotated.getpixel((round((box[0] + box[2]) / 2), y_mid)) == (128, 128, 128)


def test_ground_uses_the_family_prompt(llms, tmp_path, monkeypatch):
    seen = []
    for family in ("qwen2_vl", "qwen2_5_vl"):
        llm = llms(family)
        fix_output_text(monkeypatch, CASES[family][0])
        original = llm.processor.prepare_chat

        def spy(messages, *a, _orig=original, **k):
            seen.append(messages[0]["content"][1]["text"])
            return _orig(messages, *a, **k)

        monkeypatch.setattr(llm.processor, "prepare_chat", spy)
        result = ground_request(llm, Image.new("RGB", CASES[family][1]), "the red car")
        assert seen[-1] == grounding_prompt("the red car", family)
        assert [round(v, 2) for v in _coords(result.grounding()[0])] == CASES[family][2]


def _coords(box) -> list[float]:
    return [box.x1, box.y1, box.x2, box.y2]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_ground_with_the_real_tiny_model(family, checkpoints, tmp_path, capsys):
    ckpt = checkpoints(family)
    image = grey_png(tmp_path, (64, 48))
    capsys.readouterr()
    code = main(
        ["ground", "--model", str(ckpt), "--image", str(image), "--json", "--max-tokens", "6", "x"]
    )
    assert code == 0
    found = json.loads(capsys.readouterr().out)  # random reply: usually no objects, always JSON
    assert isinstance(found, list)


def test_ground_errors(checkpoints, tmp_path, capsys):
    ckpt = checkpoints("qwen2_5_vl")
    capsys.readouterr()
    assert main(["ground", "--model", str(ckpt), "--image", str(tmp_path / "nope.png"), "x"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    image = grey_png(tmp_path, (64, 48))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    assert main(["ground", "--model", str(empty), "--image", str(image), "x"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    bad_out = str(tmp_path / "no" / "dir" / "a.png")
    assert main(["ground", "--model", str(ckpt), "--image", str(image), "--out", bad_out, "x"]) == 2
    assert "error: " in capsys.readouterr().err
    v2 = checkpoints("qwen2_vl")
    capsys.readouterr()
    assert main(["ground", "--model", str(v2), "--image", str(image), "--point", "x"]) == 2
    assert "boxes" in capsys.readouterr().err
