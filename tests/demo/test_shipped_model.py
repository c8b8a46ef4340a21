"""The shipped demo checkpoint: it answers held-out scenes correctly, and transformers agrees.

Independent truths: the answers come from the scene generator (what was drawn), and the greedy
answers are compared with transformers' ``Qwen2_5_VLForConditionalGeneration`` fed by its own
tokenizer, chat template and image processor loaded from the same folder.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from qwenvl import LLM, SamplingParams
from qwenvl.demo import default_model_path
from qwenvl.demo.evaluate import EVAL_SEED, score
from qwenvl.demo.scenes import render
from qwenvl.demo.tasks import LIST_PROMPT, TASKS, list_answer, sample_at

GREEDY = SamplingParams(temperature=0, max_tokens=128)
IMAGE_TASKS = ("list", "count", "number", "ground")


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


def test_default_model_is_the_shipped_demo(llm) -> None:
    assert llm.path == default_model_path()
    files = {p.name for p in default_model_path().iterdir()}
    assert files == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "chat_template.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert json.loads((default_model_path() / "config.json").read_text())["model_type"] == (
        "qwen2_5_vl"
    )


def test_readme_example(llm) -> None:
    """The bundled example image with the launch article's prompt (the README's first command)."""
    from qwenvl.demo import example_image_path, example_scene

    msg = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(example_image_path())},
                {"type": "text", "text": LIST_PROMPT},
            ],
        }
    ]
    out = llm.chat([msg], GREEDY)[0].outputs[0].text
    assert out == list_answer(example_scene())


@pytest.mark.parametrize("task", TASKS)
def test_held_out_answers(llm, task) -> None:
    """A handful per task from the evaluation stream (a seed training never used)."""
    samples = [sample_at(EVAL_SEED, i, [task]) for i in range(6)]
    outs = llm.chat([s.messages(with_answer=False) for s in samples], GREEDY)
    scores = [score(s, o.outputs[0].text, o) for s, o in zip(samples, outs)]
    key = {"list": "block_acc", "ground": "iou50", "when": "within_1s"}.get(task, "acc")
    assert sum(sc[key] for sc in scores) >= 5, [o.outputs[0].text for o in outs]


def _hf_generate(folder, samples) -> list[str]:
    """Greedy answers of transformers, built only from its own pieces and the folder's files."""
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    tok = AutoTokenizer.from_pretrained(folder)
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    proc = Qwen2VLImageProcessorPil(
        min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"], patch_size=pre["patch_size"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=torch.float32
        ).eval()
    image_token = "<|image_pad|>"
    answers = []
    for s in samples:
        text = tok.apply_chat_template(
            s.messages(with_answer=False),
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        pix = proc(images=s.images, return_tensors="pt")
        merge = model.config.vision_config.spatial_merge_size**2
        parts = text.split(image_token)
        assert len(parts) == len(s.images) + 1
        expanded = parts[0]
        for grid, rest in zip(pix["image_grid_thw"], parts[1:]):
            expanded += image_token * (int(grid.prod()) // merge) + rest
        ids = tok(expanded, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(
                **ids,
                pixel_values=pix["pixel_values"],
                image_grid_thw=pix["image_grid_thw"],
                max_new_tokens=GREEDY.max_tokens,
                do_sample=False,
            )
        answers.append(tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def test_transformers_gives_the_same_greedy_answers(llm) -> None:
    """20 held-out images (the four single-image tasks), answered by both implementations."""
    samples = [sample_at(EVAL_SEED + 1, i, IMAGE_TASKS) for i in range(20)]
    ours = [o.outputs[0].text for o in llm.chat([s.messages(False) for s in samples], GREEDY)]
    theirs = _hf_generate(default_model_path(), samples)
    assert ours == theirs
    assert sum(a.strip() == s.answer for a, s in zip(ours, samples)) >= 15  # and they are right


def test_example_image_is_the_example_scene() -> None:
    """The bundled PNG is exactly the scene whose answer the README shows."""
    from PIL import Image

    from qwenvl.demo import example_image_path, example_scene

    shipped = Image.open(example_image_path()).convert("RGB")
    assert shipped.tobytes() == render(example_scene()).tobytes()


def test_cli_chat_defaults_to_the_demo(capsys) -> None:
    from qwenvl.cli.main import main
    from qwenvl.demo import example_image_path, example_scene

    assert main(["chat", "--image", str(example_image_path()), LIST_PROMPT]) == 0
    assert capsys.readouterr().out.strip() == list_answer(example_scene())


def test_cli_eval_demo(capsys) -> None:
    from qwenvl.cli.main import main

    assert main(["eval-demo", "--count", "3", "--tasks", "count,list", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"count", "list"}
    assert set(result["list"]) == {"block_acc", "exact"} and set(result["count"]) == {"acc"}
    assert all(0.0 <= v <= 1.0 for m in result.values() for v in m.values())
    assert main(["eval-demo", "--tasks", "count,colour"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_cli_ground_finds_the_block_on_the_example(tmp_path, capsys) -> None:
    from PIL import Image

    from qwenvl.cli.main import main
    from qwenvl.demo import example_image_path, example_scene
    from qwenvl.demo.evaluate import iou

    scene = example_scene()
    target = scene.blocks[len(scene.blocks) // 2]
    out = tmp_path / "boxed.png"
    args = ["ground", "--image", str(example_image_path()), "--json", "--out", str(out)]
    assert main([*args, f"the box with the number {target.number}"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert len(found) == 1 and iou(found[0]["bbox"], target.box) >= 0.5
    drawn = Image.open(out).convert("RGB")
    assert drawn.size == (scene.width, scene.height)
    assert drawn.tobytes() != Image.open(example_image_path()).convert("RGB").tobytes()
