from __future__ import annotations

import pytest
import torch
from torch import nn

import tiny
from qwenvl.checkpoint import load_model
from qwenvl.errors import ConfigError
from qwenvl.processing.prompt import Processor
from qwenvl.train.dataset import load_sft
from qwenvl.train.lora import LoraOptions, apply_lora, load_adapter, merge_lora, save_adapter
from qwenvl.train.packing import collate, sample_losses

TARGETS = ("q_proj", "v_proj", "qkv", "down_proj")


def _setup(checkpoints, sft_file, family="qwen2_vl"):
    path = checkpoints(family)
    model, config = load_model(path, dtype="float32")
    batch = collate([load_sft(sft_file, Processor.from_pretrained(path, config))], 0)
    return path, model, batch


def _logits(model, batch):
    with torch.no_grad():
        return model(
            batch.input_ids,
            batch.positions,
            batch.mask,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
        )


def _randomise_b(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)


def test_zero_b_equals_base_and_merge_equals_unmerged(checkpoints, sft_file, tmp_path):
    path, model, batch = _setup(checkpoints, sft_file)
    base = _logits(model, batch)
    options = LoraOptions(rank=4, alpha=8, targets=TARGETS, parts=("llm", "vision"))
    names = apply_lora(model, options)
    assert "visual.blocks.0.attn.qkv" in names and "model.layers.1.self_attn.q_proj" in names
    zero_b = _logits(model, batch)
    print(f"zero-B max diff {float((zero_b - base).abs().max()):.2e}")
    torch.testing.assert_close(zero_b, base, atol=1e-6, rtol=0)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    _randomise_b(model)
    unmerged = _logits(model, batch)
    assert (unmerged - base).abs().max() > 1e-3
    save_adapter(model, tmp_path / "adapter")
    merge_lora(model)
    merged = _logits(model, batch)
    print(f"merged vs unmerged max diff {float((merged - unmerged).abs().max()):.2e}")
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    # the saved adapter, loaded onto a fresh base, serves the same logits without merging
    fresh, _ = load_model(path, dtype="float32")
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(fresh, batch), unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("frozen", ["vision", "merger", "llm"])
def test_frozen_parts_get_no_gradient_and_do_not_change(checkpoints, sft_file, frozen):
    from qwenvl.train.lora import part_of

    _, model, batch = _setup(checkpoints, sft_file)
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_(part_of(n) != frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        sample_losses(model, batch).sum().backward()
        for n, p in model.named_parameters():
            if part_of(n) == frozen:
                assert p.grad is None, n
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        same = torch.equal(p, before[n])
        assert same == (part_of(n) == frozen), n


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_gradient_checkpointing_same_gradients(checkpoints, sft_file, family):
    _, model, batch = _setup(checkpoints, sft_file, family)
    model.train().requires_grad_(True)

    def grads():
        model.zero_grad()
        sample_losses(model, batch).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.model.gradient_checkpointing = model.visual.gradient_checkpointing = True
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and any(n.startswith("visual.blocks") for n in plain)
    worst = max(float((plain[n] - ckpt[n]).abs().max()) for n in plain)
    print(f"checkpointing max grad diff {worst:.2e}")
    assert worst <= 1e-5


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_default_targets_are_the_language_models_and_merge_in_peft(checkpoints, sft_file, tmp_path):
    """Qwen2.5-VL's ViT MLPs are also gate/up/down_proj; the default adapts the LLM only, and
    peft, given the adapter folder, wraps exactly the transformers LLM's projections."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    path, model, _ = _setup(checkpoints, sft_file, "qwen2_5_vl")
    assert any(n.startswith("visual.") and n.endswith("mlp.gate_proj")
               for n, _ in model.named_modules())  # fmt: skip
    apply_lora(model, LoraOptions(rank=4, alpha=8))
    _randomise_b(model)
    save_adapter(model, tmp_path / "adapter")
    hf = tiny.load_hf(path, "qwen2_5_vl")
    expected = {  # the truth: transformers' own module tree
        n
        for n, m in hf.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("model.language_model.")
        and n.rsplit(".", 1)[-1] in PROJECTIONS
    }  # fmt: skip
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer)
    }
    assert wrapped == expected and len(expected) == 7 * model.config.text.num_hidden_layers
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    pos = torch.arange(6).view(1, 1, 6).expand(3, 1, 6)
    with torch.no_grad():
        ours = model(ids, pos)
        theirs = peft_model.merge_and_unload()(input_ids=ids).logits
    diff = float((theirs - ours).abs().max())
    print(f"default-target adapter, peft merged vs ours: max logit diff {diff:.2e}")
    assert diff <= 1e-5


def test_lora_parts_reach_the_vit_only_when_asked(checkpoints, sft_file):
    _, model, _ = _setup(checkpoints, sft_file, "qwen2_5_vl")
    names = apply_lora(model, LoraOptions(targets=("qkv", "gate_proj"), parts=("llm", "vision")))
    assert {n.split(".")[0] for n in names} == {"model", "visual"}
    _, model, _ = _setup(checkpoints, sft_file, "qwen2_5_vl")
    with pytest.raises(ConfigError, match="no Linear module of llm matches"):
        apply_lora(model, LoraOptions(targets=("qkv",)))
    with pytest.raises(ConfigError, match="parts must be some of"):
        LoraOptions(parts=("vit",))
