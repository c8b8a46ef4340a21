"""The demo's tool task: what a click sample asks and answers, and the recipe's shared-opening
forward, which must give the logits of the whole conversation."""

from __future__ import annotations

import random

import pytest
import torch

from qwenvl.checkpoint import load_model
from qwenvl.demo import default_model_path
from qwenvl.demo.prefix import shared_opening_logits
from qwenvl.demo.tasks import click_sample, click_tool
from qwenvl.layers.rotary import apply_rotary
from qwenvl.models import read_config
from qwenvl.processing.prompt import Processor
from qwenvl.train.data import encode_conversation


@pytest.fixture(scope="module")
def processor() -> Processor:
    path = default_model_path()
    return Processor.from_pretrained(path, read_config(path / "config.json"))


def test_click_sample_targets_the_block_centre_in_model_pixels(processor) -> None:
    rng = random.Random(3)
    for _ in range(20):
        s = click_sample(rng)
        block = s.info["scene"].by_number(s.info["number"])
        # the model sees the 280 px scene at 140 px: half of the block's centre, rounded down
        cx, cy = (block.box[0] + block.box[2]) / 2 / 2, (block.box[1] + block.box[3]) / 2 / 2
        x, y = s.call["arguments"]["coordinate"]
        assert abs(x - cx) <= 1 and abs(y - cy) <= 1
        args = {"action": "left_click", "coordinate": [x, y]}
        assert s.call == {"name": "computer_use", "arguments": args}
        assert str(s.info["number"]) in s.question


@pytest.mark.parametrize("style", ["openai", "cookbook"])
def test_click_prompt_is_what_the_template_writes_for_tools(processor, style) -> None:
    """A sample's system message is the one ``tools=[...]`` makes the chat template write, so
    a client passing the tool (openai, qwen-agent) shows the model what it was trained on."""
    rng = random.Random(4)
    s = next(s for s in (click_sample(rng) for _ in range(20)) if s.info["style"] == style)
    with_system = processor.prepare_chat(s.messages(with_answer=False)).token_ids
    user_only = s.messages(with_answer=False)[1:]
    with_tools = processor.prepare_chat(user_only, tools=[click_tool(style)]).token_ids
    assert with_system == with_tools


def test_shared_opening_gives_the_whole_conversations_logits(processor) -> None:
    model, _ = load_model(default_model_path(), dtype="float32")
    rng = random.Random(1)
    samples = [s for s in (click_sample(rng) for _ in range(12)) if s.info["style"] == "openai"]
    encoded = [encode_conversation(processor, s.messages()) for s in samples[:3]]
    assert len({len(e) for e in encoded}) > 1  # own parts of different lengths
    cfg = processor.config
    with torch.no_grad():
        logits, labels, owner, look = shared_opening_logits(
            model, encoded, (cfg.image_token_id, cfg.video_token_id)
        )
        want, want_labels = [], []
        for e in encoded:
            pixels = torch.cat([im.pixel_values for im in e.images])
            grids = [im.grid_thw for im in e.images]
            full = model(
                torch.tensor([e.token_ids]), e.positions[:, None], pixel_values=pixels,
                image_grid_thw=grids,
            )[0]  # fmt: skip
            at = e.targets.nonzero().flatten()
            want.append(full[at - 1])
            want_labels.append(torch.tensor(e.token_ids)[at])
    assert torch.equal(labels, torch.cat(want_labels))
    assert owner.tolist() == [i for i, w in enumerate(want) for _ in range(len(w))]
    assert (logits - torch.cat(want)).abs().max() < 1e-4
    assert look == 0


def test_guided_loss_is_the_whole_conversations_attention(processor) -> None:
    """``look`` is -log of head 0's attention mass on the guided keys, as the full forward of
    the whole conversation gives it (its layer input caught by a hook, its q/k recomputed)."""
    model, _ = load_model(default_model_path(), dtype="float32")
    layer = 2
    rng = random.Random(2)
    samples = [s for s in (click_sample(rng) for _ in range(12)) if s.info["style"] == "cookbook"]
    encoded = [encode_conversation(processor, s.messages()) for s in samples[:2]]
    n = len(encoded[1])
    pairs = [(n - 5, torch.tensor([n - 40, n - 30])), (n - 3, torch.tensor([n - 60]))]
    guide = [{}, {layer: pairs}]
    cfg = processor.config
    with torch.no_grad():
        *_, look = shared_opening_logits(
            model, encoded, (cfg.image_token_id, cfg.video_token_id), guide, head=0
        )
        seen = {}
        attn = model.model.layers[layer].self_attn
        hook = attn.register_forward_hook(lambda m, a, o: seen.update(x=a[0], cos=a[1], sin=a[2]))
        e = encoded[1]
        pixels = torch.cat([im.pixel_values for im in e.images])
        model(torch.tensor([e.token_ids]), e.positions[:, None], pixel_values=pixels,
              image_grid_thw=[im.grid_thw for im in e.images])  # fmt: skip
        hook.remove()
        x = seen["x"][0]
        if hasattr(attn, "qkv_proj"):
            q, k, _ = attn.qkv_proj(x).split(attn.widths, -1)
        else:
            q, k = attn.q_proj(x), attn.k_proj(x)
        hd = attn.head_dim
        q = apply_rotary(q[:, :hd], seen["cos"][0, 0], seen["sin"][0, 0])
        k = apply_rotary(k[:, :hd], seen["cos"][0, 0], seen["sin"][0, 0])
        want = []
        for j, keys in pairs:
            p = ((q[j] @ k[: j + 1].T) / hd**0.5).softmax(-1)
            want.append(-p[keys].sum().log())
    assert abs(float(look) - float(torch.stack(want).mean())) < 1e-4


def test_confirmation_eval_asks_what_training_shows(processor) -> None:
    """``eval-demo``'s confirmation turn is a training conversation cut before the reply: the
    same tokens, whichever tool result it picks."""
    from qwenvl.demo.evaluate import confirmation_chat
    from qwenvl.demo.tasks import TOOL_RESULTS, click_confirmation

    rng = random.Random(7)
    samples = [s for s in (click_sample(rng) for _ in range(40)) if s.follow_up][:5]
    for s in samples:
        x, y = s.call["arguments"]["coordinate"]
        index = TOOL_RESULTS.index(
            next(t for t in TOOL_RESULTS if t.format(x=x, y=y) == s.follow_up[0]["content"])
        )
        asked = processor.prepare_chat(confirmation_chat(s, index)).token_ids
        whole = encode_conversation(processor, s.messages())
        reply = processor.tokenizer.backend.encode(click_confirmation(s.info["number"])).ids
        assert whole.token_ids[: len(asked)] == asked
        assert whole.token_ids[len(asked) : len(asked) + len(reply)] == reply
