"""The shipped demo checkpoint: the default model, right on held-out scenes; transformers agrees.

Independent truths: the answers come from the scene generator (what was drawn, with a seed the
training never used), and the greedy answers are compared with transformers'
``Qwen2_5_VLForConditionalGeneration`` fed by its own tokenizer, chat template and image processor
loaded from the shipped folder.
"""

from __future__ import annotations

import json

import pytest

from hf_demo import RELEASED_FILES, hf_generate  # tests/hf_demo.py
from qwenvl import LLM, SamplingParams
from qwenvl.demo import default_model_path, example_image_path, example_scene
from qwenvl.demo.evaluate import EVAL_SEED, score
from qwenvl.demo.tasks import LIST_PROMPT, list_answer, sample_at

GREEDY = SamplingParams(temperature=0, max_tokens=128)
IMAGE_TASKS = ("list", "count", "number", "ground")
# per task: the metric, and the least share of 12 held-out answers that must score: one answer
# under what the shipped weights give on these 12 (greedy, so it only moves with numerics);
# the 300-sample accuracy of the README table in the comments.
FLOORS = {
    "list": ("block_acc", 0.9),  # 12: 99.1 %; 300: 97.8 %
    "count": ("acc", 0.91),  # 12: 100 %; 300: 100 %
    "number": ("acc", 0.83),  # 12: 91.7 %; 300: 95.3 %
    "ground": ("iou50", 0.91),  # 12: 100 %; 300: 99.7 %
    "compare": ("acc", 0.91),  # 12: 100 %; 300: 97.0 %
    "when": ("within_1s", 0.91),  # 12: 100 %; 300: 99.7 %
    "click": ("inside", 0.91),  # 12: 100 %; 300: 99.7 % (the click inside the named block)
}


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


def test_default_model_is_the_shipped_demo(llm) -> None:
    assert llm.path == default_model_path()
    assert {p.name for p in default_model_path().iterdir()} == RELEASED_FILES
    config = json.loads((default_model_path() / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"


def test_readme_example(llm) -> None:
    """The bundled example image with the launch article's prompt: the README's first command."""
    msg = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(example_image_path())},
                {"type": "text", "text": LIST_PROMPT},
            ],
        }
    ]
    assert llm.chat([msg], GREEDY)[0].outputs[0].text == list_answer(example_scene())


@pytest.mark.parametrize("task", sorted(FLOORS))
def test_held_out_answers(llm, task) -> None:
    samples = [sample_at(EVAL_SEED, i, [task]) for i in range(12)]
    outs = llm.chat([s.messages(with_answer=False) for s in samples], GREEDY)
    metric, floor = FLOORS[task]
    got = [score(s, o.outputs[0].text, o)[metric] for s, o in zip(samples, outs)]
    assert sum(got) / len(got) >= floor, [o.outputs[0].text for o in outs]


def test_transformers_gives_the_same_greedy_answers(llm) -> None:
    """20 held-out images of the four single-image tasks, answered by both implementations."""
    samples = [sample_at(EVAL_SEED + 1, i, IMAGE_TASKS) for i in range(20)]
    outs = llm.chat([s.messages(with_answer=False) for s in samples], GREEDY)
    theirs = hf_generate(default_model_path(), samples, GREEDY.max_tokens)
    eos = set(
        json.loads((default_model_path() / "generation_config.json").read_text())["eos_token_id"]
    )
    for out, (prompt, generated) in zip(outs, theirs):
        assert out.prompt_token_ids == prompt
        ours = [t for t in out.outputs[0].token_ids if t not in eos]
        assert [t for t in generated if t not in eos] == ours


def test_cli_chat_defaults_to_the_demo(capsys) -> None:
    from qwenvl.cli.main import main

    assert main(["chat", "--image", str(example_image_path()), LIST_PROMPT]) == 0
    assert capsys.readouterr().out.strip() == list_answer(example_scene())


def test_cli_ground_finds_and_draws_boxes_on_the_example(tmp_path, capsys) -> None:
    """``qwenvl ground`` on the README picture: each asked-for box overlaps where the block was
    drawn (IoU >= 0.5, in original pixels), and ``--out`` draws it there."""
    from PIL import Image

    from qwenvl.cli.main import main
    from qwenvl.demo.evaluate import iou
    from qwenvl.demo.tasks import ground_phrase

    scene = example_scene()
    original = Image.open(example_image_path()).convert("RGB")
    for block in scene.blocks[::3]:
        out = tmp_path / f"box{block.number}.png"
        phrase = ground_phrase(block.number)
        argv = ["ground", "--image", str(example_image_path()), "--json", "--out", str(out)]
        assert main([*argv, phrase]) == 0
        (found,) = json.loads(capsys.readouterr().out)
        assert found["type"] == "box" and found["label"] == phrase
        assert iou(found["bbox"], block.box) >= 0.5, (found, block)
        drawn = Image.open(out).convert("RGB")
        x1, y1, x2, y2 = (round(v) for v in found["bbox"])
        bottom = ((x1 + x2) // 2, y2 - 1)  # the drawn rectangle's bottom edge
        assert drawn.getpixel(bottom) != original.getpixel(bottom)
