from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tiny
from conftest import sft_lines, write_jsonl
from qwenvl.sampling import SamplingParams
from qwenvl.train import LoraOptions, TrainConfig, train

OVERFIT_LOSS = 0.05


def _types(ids, llm):
    """transformers 5 finds image tokens through mm_token_type_ids (1 = image)."""
    return (ids == llm.config.image_token_id).long()


def test_full_finetune_overfits_and_exports_hf_layout(checkpoints, sft_file, tmp_path):
    from qwenvl import LLM

    out = tmp_path / "run"
    result = train(
        TrainConfig(
            model=str(checkpoints("qwen2_vl")),
            data=str(sft_file),
            output=str(out),
            lr=1e-2,
            epochs=60,
            pack=512,
            warmup_steps=3,
            seed=1,
            progress=False,
            eval_data=str(sft_file),
            eval_every=20,
        )
    )
    losses = [m["loss"] for m in result.metrics if "loss" in m]
    print(f"overfit: first loss {losses[0]:.3f}, last {losses[-1]:.4f}")
    assert losses[-1] < OVERFIT_LOSS < losses[0]
    assert (out / "loss.png").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0].keys() >= {"step", "loss", "lr", "tokens_per_s"}
    assert any("eval_loss" in x for x in lines)
    final = result.final
    for name in (
        "config.json",
        "tokenizer.json",
        "chat_template.json",
        "generation_config.json",
        "preprocessor_config.json",
        "model.safetensors",
    ):
        assert (final / name).is_file(), name
    # the trained model answers the training prompt with its answer, in both implementations
    line = sft_lines()[0]
    prompt = [{**m} for m in line["messages"][:1]]
    prompt[0]["content"] = [
        {**prompt[0]["content"][0], "image": str(sft_file.parent / "images/im0.png")},
        prompt[0]["content"][1],
    ]
    llm = LLM(final, dtype="float32")
    ours = llm.chat(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    hf = tiny.load_hf(final, "qwen2_vl")
    ids = torch.tensor([llm.processor.prepare_chat(prompt).token_ids])
    p = llm.processor.prepare_chat(prompt)
    gen = hf.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=_types(ids, llm),
        pixel_values=p.images[0].pixel_values,
        image_grid_thw=torch.tensor([p.images[0].grid_thw]),
        max_new_tokens=12,
        do_sample=False,
    )
    hf_ids = gen[0, ids.shape[1] :].tolist()
    assert ours.token_ids == hf_ids[: len(ours.token_ids)]
    assert ours.text.startswith(line["messages"][1]["content"])


def test_lora_adapter_loads_in_peft_and_matches(checkpoints, sft_file, tmp_path):
    from peft import PeftModel

    from qwenvl import LLM

    path = checkpoints("qwen2_5_vl")
    out = tmp_path / "lora"
    result = train(
        TrainConfig(
            model=str(path),
            data=str(sft_file),
            output=str(out),
            lr=1e-2,
            epochs=3,
            lora=LoraOptions(
                rank=4,
                alpha=8,
                targets=("q_proj", "v_proj", "qkv", "gate_proj"),
                parts=("llm", "vision"),
            ),
            progress=False,
            plot=False,
        )
    )
    adapter = result.final
    assert (adapter / "adapter_config.json").is_file()
    llm = LLM(path, dtype="float32", lora=adapter)
    hf = PeftModel.from_pretrained(tiny.load_hf(path, "qwen2_5_vl"), adapter).eval()
    line = sft_lines()[0]
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(sft_file.parent / "images/im0.png")},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ]
    p = llm.processor.prepare_chat(msgs)
    ids = torch.tensor([p.token_ids])
    with torch.no_grad():
        ours = llm.model(
            ids,
            p.positions[:, None],
            pixel_values=p.images[0].pixel_values,
            image_grid_thw=[p.images[0].grid_thw],
        )
        theirs = hf(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=_types(ids, llm),
            pixel_values=p.images[0].pixel_values,
            image_grid_thw=torch.tensor([p.images[0].grid_thw]),
        ).logits
        base = tiny.load_hf(path, "qwen2_5_vl")(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=_types(ids, llm),
            pixel_values=p.images[0].pixel_values,
            image_grid_thw=torch.tensor([p.images[0].grid_thw]),
        ).logits
    diff = float((ours - theirs).abs().max())
    print(
        f"peft parity max logit diff {diff:.2e} (adapter moves logits by "
        f"{float((theirs - base).abs().max()):.2e})"
    )
    assert diff <= 1e-5 and float((theirs - base).abs().max()) > 1e-3
    assert line  # the adapter was trained on this file


SCRIPT = """
import os, signal, sys
sys.path.insert(0, {src!r})
from qwenvl.train import LoraOptions, TrainConfig, train
kill_after = int(sys.argv[2])
def hook(step, metrics):
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
cfg = TrainConfig(model={model!r}, data={data!r}, output=sys.argv[1], lr=1e-3, epochs=3,
                  batch_size=2, grad_accum=1, save_every=2, seed=3, progress=False, plot=False,
                  lora=LoraOptions(rank=4, alpha=8, dropout=0.1), resume="latest")
train(cfg, on_step_end=hook if kill_after else None)
"""


def test_sigkill_and_resume_matches_uninterrupted_run(checkpoints, sft_file, tmp_path):
    src = str(Path(__file__).parents[2] / "src")
    script = tmp_path / "run.py"
    model = str(checkpoints("qwen2_vl"))
    script.write_text(textwrap.dedent(SCRIPT.format(src=src, model=model, data=str(sft_file))))

    def run(out, kill_after=0):
        return subprocess.run([sys.executable, str(script), str(out), str(kill_after)], timeout=300)

    assert run(tmp_path / "straight").returncode == 0
    killed = run(tmp_path / "killed", kill_after=5)
    assert killed.returncode == -signal.SIGKILL
    assert run(tmp_path / "killed").returncode == 0  # resume="latest": continues from step 4

    def losses(out):
        return {
            json.loads(x)["step"]: json.loads(x)["loss"]
            for x in (out / "metrics.jsonl").read_text().splitlines()
        }

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert a.keys() == b.keys() == set(range(1, 7))
    worst = max(abs(a[k] - b[k]) for k in a)
    print(f"resume max loss diff {worst:.2e}")
    assert worst <= 1e-6


def test_bad_data_fails_before_loading_work(checkpoints, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}])
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        train(
            TrainConfig(
                model=str(checkpoints("qwen2_vl")), data=str(path), output=str(tmp_path / "o")
            )
        )


def test_separate_learning_rates_and_frozen_parts(checkpoints, sft_file, tmp_path):
    from qwenvl.train import Trainer
    from qwenvl.train.lora import part_of

    cfg = TrainConfig(
        model=str(checkpoints("qwen2_vl")),
        data=str(sft_file),
        output=str(tmp_path / "o"),
        lr=1e-4,
        vision_lr=1e-5,
        merger_lr=3e-5,
        freeze_llm=True,
        weight_decay=0.1,
    )
    trainer = Trainer(cfg)
    seen = {}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for g in trainer.optimizer.param_groups:
        for p in g["params"]:
            seen[part_of(names[id(p)])] = g["lr"]
            assert g["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0)
    assert seen == {"vision": 1e-5, "merger": 3e-5}
