"""The demo checkpoint format end to end, on freshly initialised weights of the demo shape.

Independent truths: transformers' ``Qwen2_5_VLForConditionalGeneration``, fed by its own tokenizer,
chat template and image processor loaded from the same folder, must give the same greedy answers
as ``LLM``; the example picture must be exactly the scene whose answer the README would show.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_demo import RELEASED_FILES, hf_generate  # tests/hf_demo.py
from qwenvl import LLM, SamplingParams
from qwenvl.demo import checkpoint as demo_ckpt
from qwenvl.demo.evaluate import EVAL_SEED
from qwenvl.demo.scenes import render
from qwenvl.demo.tasks import sample_at
from qwenvl.errors import CheckpointError

GREEDY = SamplingParams(temperature=0, max_tokens=24)
IMAGE_TASKS = ("list", "count", "number", "ground")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = demo_ckpt.write_files(tmp_path_factory.mktemp("demo") / "model")
    model = demo_ckpt.new_model(out, seed=3)
    with torch.no_grad():  # break the symmetric init so answers differ between images
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    demo_ckpt.save_weights(model, out, torch.bfloat16)
    return out


@pytest.fixture(scope="module")
def llm(folder) -> LLM:
    return LLM(folder)


def test_released_file_set(folder) -> None:
    from transformers import Qwen2_5_VLConfig

    assert {p.name for p in folder.iterdir()} == RELEASED_FILES
    cfg = Qwen2_5_VLConfig.from_pretrained(folder)
    assert cfg.vision_config.depth == 6 and cfg.text_config.num_hidden_layers == 4


def test_transformers_gives_the_same_greedy_answers(folder, llm) -> None:
    """20 held-out images (the four single-image tasks), answered by both implementations."""
    samples = [sample_at(EVAL_SEED + 1, i, IMAGE_TASKS) for i in range(20)]
    outs = llm.chat([s.messages(False) for s in samples], GREEDY)
    theirs = hf_generate(folder, samples, GREEDY.max_tokens)
    eos = set(json.loads((folder / "generation_config.json").read_text())["eos_token_id"])
    for out, (prompt, generated) in zip(outs, theirs):
        assert out.prompt_token_ids == prompt
        ours = [t for t in out.outputs[0].token_ids if t not in eos]  # stop token: ours or not
        assert generated[: len(ours)] == ours
        assert len(generated) == len(ours) or generated[len(ours)] in eos
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 1  # answers depend on the image


def test_cli_eval_demo(folder, capsys) -> None:
    from qwenvl.cli.main import main

    args = ["eval-demo", "--model", str(folder), "--count", "2", "--json"]
    assert main([*args, "--tasks", "count,list,ground,when"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"count", "list", "ground", "when"}
    assert set(result["list"]) == {"block_acc", "exact"} and set(result["count"]) == {"acc"}
    assert set(result["ground"]) == {"iou50"} and set(result["when"]) == {"within_1s"}
    assert all(0.0 <= v <= 1.0 for m in result.values() for v in m.values())
    assert main([*args, "--tasks", "count,colour"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_example_image_is_the_example_scene() -> None:
    """The bundled PNG is exactly the scene whose answer the README shows."""
    from PIL import Image

    from qwenvl.demo import example_image_path, example_scene

    shipped = Image.open(example_image_path()).convert("RGB")
    assert shipped.tobytes() == render(example_scene()).tobytes()


def test_no_model_without_the_bundled_demo(tmp_path, monkeypatch) -> None:
    import qwenvl.demo

    monkeypatch.setattr(qwenvl.demo, "default_model_path", lambda: tmp_path / "demo-model")
    with pytest.raises(CheckpointError, match="demo model"):
        LLM()


def test_cli_without_model_or_bundled_demo(tmp_path, monkeypatch, capsys) -> None:
    from qwenvl.cli import main as cli

    monkeypatch.setattr(cli, "default_model_path", lambda: tmp_path / "demo-model")
    assert cli.main(["chat", "hello"]) == 2
    assert "pass --model" in capsys.readouterr().err
