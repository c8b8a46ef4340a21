"""The demo recipe's extra supervision: where the guided heads must look, checked against the
model's real attention, and the places the decoder's probe must name."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from qwenvl.demo.scenes import CELL, SIDE
from qwenvl.demo.supervision import answer_targets, item_labels, sample_scenes
from qwenvl.demo.tasks import VIDEO_SIDE, make_sample, resized_box
from qwenvl.demo.train import CUE_LAYER, GUIDED_HEAD, GUIDED_LAYERS, STAGES, Recipe
from qwenvl.layers.rotary import apply_rotary
from qwenvl.train.data import encode_conversation
from qwenvl.train.packing import collate


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Recipe:
    r = Recipe(tmp_path_factory.mktemp("recipe"), seed=5)
    with torch.no_grad():  # a trained-looking, non-uniform attention
        for p in r.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return r


def test_answer_spans_name_each_block() -> None:
    rng = random.Random(2)
    s = make_sample("list", rng, max_blocks=10)
    spans = answer_targets(s)
    blocks = s.info["scene"].blocks  # reading order
    assert [s.answer[a:b] for a, b, _, _ in spans] == [f"{b.colour} {b.number}" for b in blocks]
    assert [n for _, _, n, g in spans] == [b.number for b in blocks]
    g = make_sample("ground", rng)
    ((a, b, n, group),) = answer_targets(g)
    box = resized_box(g.info["scene"], g.info["number"])
    assert (g.answer[a:b], n, group) == (json.dumps(box), g.info["number"], -1)
    w = make_sample("when", rng)
    assert answer_targets(w) == [(0, len(w.answer), w.info["number"], w.info["second"])]
    assert answer_targets(make_sample("count", rng)) == []


def _forward(r: Recipe, sample):
    e = encode_conversation(r.processor, sample.messages())
    b = collate([[e]], r.processor.tokenizer.require_id("<|endoftext|>"))
    with torch.no_grad():
        feats = r.model.encode_vision(
            b.pixel_values if b.pixel_values is not None else b.pixel_values_videos,
            b.image_grid_thw or b.video_grid_thw,
        )
        video = b.pixel_values is None
        emb = r.model.embed(b.input_ids, None if video else feats, feats if video else None)
        r.model(b.input_ids, b.positions, b.mask, inputs_embeds=emb)
    return e, b


@pytest.mark.parametrize("task", ["list", "number", "ground", "when"])
def test_guided_loss_is_the_real_attention_on_the_block(recipe: Recipe, task: str) -> None:
    """Head 0's attention, recomputed by the loss, reproduces the model's own attention output;
    the keys are exactly the block's vision tokens; the loss is -log of their mass."""
    r = recipe
    s = make_sample(task, random.Random(7))
    outputs = {}

    def keep(module, args):
        outputs[module.layer] = args[0]

    hooks = []
    for i in (CUE_LAYER, *GUIDED_LAYERS):
        o_proj = r.model.model.layers[i].self_attn.o_proj
        o_proj.layer = i
        hooks.append(o_proj.register_forward_pre_hook(keep))
    try:
        e, b = _forward(r, s)
    finally:
        for h in hooks:
            h.remove()
    labels = item_labels(sample_scenes(s)[0], (e.videos or e.images)[0].grid_thw)
    guide = r.attention_targets(s, e, labels)
    targets = guide[GUIDED_LAYERS[0]]
    assert targets and all(guide[layer] == targets for layer in GUIDED_LAYERS)
    vision_id = r.config.video_token_id if s.video else r.config.image_token_id
    slots = [i for i, t in enumerate(e.token_ids) if t == vision_id]
    read = []
    for q, keys in targets:
        assert e.targets[q + 1]  # the query predicts an answer token
        rows = [slots.index(int(k)) for k in keys]
        assert {int(labels[i, 4]) for i in rows} == {int(labels[rows[0], 4])}  # one block
        assert len(rows) == int((labels[:, 4] == labels[rows[0], 4]).sum()) or s.video
        read.append(int(labels[rows[0], 4]))
    if task == "list":  # every block, in reading order
        assert list(dict.fromkeys(read)) == [b.number for b in s.info["scene"].blocks]
    elif task == "when":  # the block asked for, in the second it appears only
        assert set(read) == {s.info["number"]}
        assert len(targets[0][1]) == 1
    else:
        assert set(read) == {s.info["number"] if task == "ground" else int(s.answer)}
    tok = r.processor.tokenizer
    if task == "list":  # the block is named by the answer itself: no cue words
        assert CUE_LAYER not in guide
    else:  # the cue: the colour asked for, or the number N, in the question
        cue = guide[CUE_LAYER]
        assert [q for q, _ in cue] == [q for q, _ in targets]
        words = tok.decode([e.token_ids[i] for i in cue[0][1].tolist()]).strip()
        block = s.info["scene"].by_number(read[0])
        assert words == (block.colour if task == "number" else str(block.number))
        assert all(i < min(slots) or i > max(slots) for i in cue[0][1].tolist())
    expected = []
    for layer in (CUE_LAYER, *GUIDED_LAYERS):
        pairs = guide.get(layer, [])
        x, cos, sin, mask = r.seen[layer]
        attn = r.model.model.layers[layer].self_attn
        hd = attn.head_dim
        # the model's own output of head 0 at the query rows (SDPA, before o_proj)
        real = outputs[layer][0, :, GUIDED_HEAD * hd : (GUIDED_HEAD + 1) * hd]
        q = apply_rotary(
            (attn.q_proj(x)[0, :, GUIDED_HEAD * hd : (GUIDED_HEAD + 1) * hd]), cos[0, 0], sin[0, 0]
        )
        kv = GUIDED_HEAD // (attn.num_heads // attn.num_kv_heads)
        k = apply_rotary(attn.k_proj(x)[0, :, kv * hd : (kv + 1) * hd], cos[0, 0], sin[0, 0])
        v = attn.v_proj(x)[0, :, kv * hd : (kv + 1) * hd]
        p = ((q @ k.T) / math.sqrt(hd)).masked_fill(~mask[0, 0], float("-inf")).softmax(-1)
        torch.testing.assert_close(p @ v, real, atol=1e-4, rtol=1e-4)
        for at, keys in pairs:
            expected.append(-math.log(float(p[at, keys].sum())))
    with torch.no_grad():
        loss = r.attention_loss([guide])
    assert float(loss) == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_places_by_hand(recipe: Recipe) -> None:
    r = recipe
    s = make_sample("compare", random.Random(1))
    e = encode_conversation(r.processor, s.messages())
    at, where = r.places(e)
    n = (SIDE // CELL) ** 2  # 25 tokens a scene
    assert len(at) == 2 * n
    assert all(e.token_ids[i] == r.config.image_token_id for i in at.tolist())
    for k in range(n):
        assert where[k].tolist() == where[n + k].tolist() == [0, k // 5, k % 5]
    v = make_sample("when", random.Random(3))
    e = encode_conversation(r.processor, v.messages())
    at, where = r.places(e)
    side = VIDEO_SIDE // 28  # 4 x 4 tokens a second
    assert len(at) == len(v.video) // 2 * side * side
    k = 2 * side * side + side + 3  # second 2, row 1, column 3
    assert where[k].tolist() == [2, 1, 3]


def _guides(r: Recipe, samples, encoded) -> list:
    """The recipe's attention targets of single-item samples, from their scenes' cell labels."""
    return [
        r.attention_targets(
            s, e, item_labels(sample_scenes(s)[0], (e.videos or e.images)[0].grid_thw)
        )
        for s, e in zip(samples, encoded)
    ]


def test_readout_targets_are_the_read_blocks_place(recipe: Recipe) -> None:
    """Grounding: every token of the box's numbers is supervised with the block's cell (in
    vision tokens: scene pixels // CELL); ``when``: the answer digit with the second it appears."""
    r = recipe
    rng = random.Random(5)
    g, w, n = make_sample("ground", rng), make_sample("when", rng), make_sample("number", rng)
    encoded = [encode_conversation(r.processor, s.messages()) for s in (g, w, n)]
    guides = _guides(r, (g, w, n), encoded)
    got = Recipe.readout_targets((g, w, n), [r.places(e) for e in encoded], guides)
    box = g.info["scene"].by_number(g.info["number"]).box
    ground = [(q, t.tolist()) for b, q, t in got if b == 0]
    tokenizer = r.processor.tokenizer.backend
    read = tokenizer.decode([encoded[0].token_ids[q + 1] for q, _ in ground])
    assert read == json.dumps(resized_box(g.info["scene"], g.info["number"]))[1:-1]
    assert all(t == [0, box[1] // CELL, box[0] // CELL] for _, t in ground)
    when = [(q, t.tolist()) for b, q, t in got if b == 1]
    block = w.info["scene"].by_number(w.info["number"]).box
    assert [t for _, t in when] == [[w.info["second"], block[1] // CELL, block[0] // CELL]]
    assert encoded[1].token_ids[when[0][0] + 1] == tokenizer.encode(w.answer).ids[0]
    assert not [b for b, _, _ in got if b == 2]  # reading what a block is needs no place


def test_span_loss_weighs_each_samples_place_tokens_as_one(recipe: Recipe) -> None:
    """By hand: per sample, the mean of -log p(next token) over its box numbers (or second);
    then the mean over samples, so a 12-token box and a 1-token second weigh the same."""
    r = recipe
    rng = random.Random(6)
    samples = [make_sample(t, rng) for t in ("ground", "count", "when")]
    encoded = [encode_conversation(r.processor, s.messages()) for s in samples]
    guides = _guides(r, samples, encoded)
    read_out = Recipe.readout_targets(samples, [r.places(e) for e in encoded], guides)
    torch.manual_seed(0)
    ids = torch.zeros(3, max(len(e.token_ids) for e in encoded), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, : len(e.token_ids)] = torch.tensor(e.token_ids)
    logits = torch.randn(*ids.shape, r.config.text.vocab_size)
    per_sample = {}
    for b, q, _ in read_out:
        nll = -logits[b, q].log_softmax(-1)[encoded[b].token_ids[q + 1]]
        per_sample.setdefault(b, []).append(float(nll))
    assert sorted(per_sample) == [0, 2] and len(per_sample[2]) == 1 and len(per_sample[0]) > 8
    want = sum(sum(v) / len(v) for v in per_sample.values()) / 2
    assert float(Recipe.span_loss(ids, logits, read_out)) == pytest.approx(want, rel=1e-5)


def test_joint_step_runs_every_task(recipe: Recipe) -> None:
    rng = random.Random(9)
    samples = [make_sample(t, rng) for t in ("list", "compare", "when", "ground")]
    loss, metrics = recipe.joint_step(samples, STAGES[-1])
    assert torch.isfinite(loss)
    assert metrics["look"] > 0 and metrics["place"] > 0 and metrics["found"] > 0


def test_retraining_is_deterministic_and_resumable(tmp_path) -> None:
    """The same command gives the same weights, bit for bit, also when it was interrupted and
    resumed from its checkpoint: what makes the shipped weights reproducible."""
    import shutil
    from dataclasses import replace

    short = tuple(
        replace(s, steps=2, batch=4, crops=8 if s.crops else 0, clicks=min(s.clicks, 1))
        for s in STAGES
    )
    first = Recipe(tmp_path / "a", seed=1)
    first.run(short, progress=False)
    shutil.copytree(tmp_path / "a" / "files", tmp_path / "b" / "files")
    # interrupted after the joint stage's first step (the schedule of step 0 is the same)
    cut = (*short[:2], replace(short[2], steps=1))
    Recipe(tmp_path / "b", seed=1).run(cut, progress=False)
    resumed = Recipe(tmp_path / "b", seed=1)
    resumed.run(short, progress=False)
    a, b = first.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = Recipe(tmp_path / "c", seed=1).model.state_dict()
    assert not all(torch.equal(a[k], fresh[k]) for k in a)  # and training did change them


def test_a_stage_from_export_continues_as_init_does(tmp_path) -> None:
    """The tool stages were first run one at a time, each from the model the previous one
    exported (``--init``); with ``from_export`` one command gives the same weights, bit for bit.
    Also: ``stop`` ends a stage early on its full schedule."""
    from dataclasses import replace

    from qwenvl.demo import checkpoint as demo_ckpt

    read = replace(STAGES[1], steps=2, batch=2)
    tools = replace(STAGES[4], steps=8, stop=2, batch=2, clicks=1, from_export=True)
    one = Recipe(tmp_path / "one", seed=1)
    one.run((read, tools), progress=False)
    assert [m["step"] for m in one.metrics] == [1, 2, 1, 2]
    # step 2 of an 8-step cosine (2 % warm-up), not the end of a 2-step one
    want = tools.lr * 0.02 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 8)))
    assert one.metrics[-1]["lr"] == pytest.approx(want, rel=1e-12)
    exported = Recipe(tmp_path / "x", seed=1).run((read,), progress=False)
    chained = Recipe(tmp_path / "y", seed=1, init=exported)
    chained.run((replace(read, steps=0), tools), progress=False)
    model = demo_ckpt.new_model(exported)
    demo_ckpt.load_weights(model, exported)
    a, b = one.model.state_dict(), chained.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = model.state_dict()
    assert not all(torch.equal(a[k], start[k]) for k in a)  # the tools stage did train


def test_a_clicks_confirmation_is_guided_to_the_named_block(recipe: Recipe) -> None:
    """After the tool's result, the confirmation's number tokens are supervised like the call's
    coordinates: the guided heads look at that block, the cue head at the question's number."""
    from qwenvl.demo.tasks import click_confirmation, click_sample

    r = recipe
    rng = random.Random(11)
    samples = [s for s in (click_sample(rng) for _ in range(40)) if s.follow_up][:6]
    assert len(samples) == 6
    tok = r.processor.tokenizer.backend
    for s in samples:
        e = encode_conversation(r.processor, s.messages())
        (guide,) = _guides(r, [s], [e])
        queries = [q for q, _ in guide[GUIDED_LAYERS[0]]]
        tool_at = max(i for i, t in enumerate(e.token_ids) if t == tok.token_to_id("<|im_start|>"))
        tail = [q for q in queries if q + 1 > tool_at]  # the last assistant turn's tokens
        written = tok.decode([e.token_ids[q + 1] for q in tail])
        assert written == str(s.info["number"]), (written, click_confirmation(s.info["number"]))
        block = s.info["scene"].by_number(s.info["number"])
        labels = item_labels([s.info["scene"]], e.images[0].grid_thw)
        want = set(torch.nonzero(labels[:, 4] == s.info["number"]).flatten().tolist())
        for q, keys in guide[GUIDED_LAYERS[0]]:
            if q in tail:  # the block's vision tokens, by their order among the image's
                slots = [i for i, t in enumerate(e.token_ids) if t == r.config.image_token_id]
                assert {slots.index(k) for k in keys.tolist()} == want, block
        cue = {q: k for q, k in guide[CUE_LAYER]}
        for q in tail:
            assert tok.decode([e.token_ids[k] for k in cue[q].tolist()]).strip() == str(
                s.info["number"]
            )
