"""The engine is exact: every request's greedy output is the same alone or in any batch, with
every cache on or off, with chunked prefill, streamed, and after preemptions; caches never mix up
images; memory stays inside the KV budget and every block comes back."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl import SamplingParams
from qwenvl.engine.async_engine import AsyncEngine
from qwenvl.engine.config import EngineConfig
from qwenvl.engine.engine import LLMEngine
from qwenvl.errors import PromptError

GREEDY = SamplingParams(temperature=0, max_tokens=10, min_tokens=10)


def image(seed: int, w: int = 70, h: int = 100) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def user(*content) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def convs() -> list[list[dict]]:
    return [
        user(text("hello there, how are you today?")),
        user({"type": "image", "image": image(4)}, text("Describe.")),
        user(
            {"type": "image", "image": image(2, 200, 150)},
            {"type": "image", "image": image(3)},
            text("Compare the two pictures in detail."),
        ),
        user(
            {
                "type": "video",
                "video": [image(i, 84, 56) for i in range(4)],
                "max_pixels": 56 * 84,
            },
            text("What happens?"),
        ),
    ]


def engine_for(llm, **cfg) -> LLMEngine:
    return LLMEngine(llm.model, llm.tokenizer, llm.eos_token_ids, EngineConfig(**cfg))


def run(engine: LLMEngine, prompts, params=GREEDY) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished:
        engine.step()
    return [engine.pop_finished(i).sequences[0].token_ids for i in ids]


@pytest.fixture(scope="module")
def reference(llms):
    """Each conversation alone on a plain engine: no prefix cache, no encoder cache, one-shot."""
    out = {}
    for family in ("qwen2_vl", "qwen2_5_vl"):
        llm = llms(family)
        prompts = [llm.processor.prepare_chat(c) for c in convs()]
        plain = dict(enable_prefix_caching=False, encoder_cache_memory=0)
        out[family] = [run(engine_for(llm, **plain), [p])[0] for p in prompts]
    return out


VARIANTS = {
    "batched": dict(enable_prefix_caching=False, encoder_cache_memory=0),
    "prefix cache": dict(encoder_cache_memory=0),
    "encoder cache": dict(enable_prefix_caching=False),
    "chunked prefill": dict(max_num_batched_tokens=7),
    "tiny blocks": dict(block_size=1),
    # 46 + 41 prompt tokens are admitted, then decoding outgrows the 100 slots
    "preemption": dict(num_kv_blocks=50, block_size=2),
}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_invariance(family, variant, llms, reference):
    llm = llms(family)
    # The check has teeth only if the outputs depend on their prompts: no reply is one token over
    # and over (a stuck model reads the same whatever a bug feeds it) and no two replies are the
    # same (a request handed another's logits or KV shows).
    assert all(len(set(ref)) >= 5 for ref in reference[family]), reference[family]
    assert len({tuple(ref) for ref in reference[family]}) == len(convs())
    engine = engine_for(llm, **VARIANTS[variant])
    order = [3, 0, 1, 2] if variant == "preemption" else [0, 1, 2, 3]
    prompts = [llm.processor.prepare_chat(convs()[i]) for i in order]
    # twice over: the second round hits the caches the first one filled
    got = run(engine, prompts) + run(engine, prompts)
    assert got == [reference[family][i] for i in order] * 2
    if variant == "preemption":
        assert engine.stats["preemptions"] > 0
    if variant == "prefix cache":
        assert engine.stats["prefix_cache_hits"] > 0
    if variant == "encoder cache":
        assert engine.stats["encoder_cache_hits"] == 4  # 4 images + 1 video, one image twice
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    engine.blocks.check_invariants()


def test_streaming_and_n_equal_batch(llms, reference):
    llm = llms("qwen2_vl")
    engine = engine_for(llm)
    prompts = [llm.processor.prepare_chat(c) for c in convs()]
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=10, n=2)
    ids = [engine.add_request(p, params) for p in prompts]
    streamed: dict[tuple[str, int], list[int]] = {}
    while engine.has_unfinished:
        for e in engine.step():
            streamed.setdefault((e.request_id, e.index), []).extend(e.token_ids)
    for rid, ref in zip(ids, reference["qwen2_vl"]):
        assert streamed[(rid, 0)] == streamed[(rid, 1)] == ref
        engine.pop_finished(rid)


def test_same_image_hits_both_caches_and_skips_the_vit(llms):
    llm = llms("qwen2_5_vl")
    engine = engine_for(llm)
    first = llm.processor.prepare_chat(user({"type": "image", "image": image(7)}, text("What?")))
    run(engine, [first])
    assert engine.stats["vit_items"] == 1
    # a second user asks another question about the same picture
    second = llm.processor.prepare_chat(
        user({"type": "image", "image": image(7)}, text("Which colours?"))
    )
    hits = engine.stats["prefix_cache_hits"]
    run(engine, [second])
    assert engine.stats["vit_items"] == 1  # no second trip through the vision tower
    assert engine.stats["prefix_cache_hits"] > hits  # the image's KV blocks were reused
    # a different system prompt moves the image: no prefix hit, but the encoder cache has it
    third = llm.processor.prepare_chat(
        [{"role": "system", "content": "Be brief."}]
        + user({"type": "image", "image": image(7)}, text("What?"))
    )
    enc_hits = engine.stats["encoder_cache_hits"]
    run(engine, [third])
    assert engine.stats["vit_items"] == 1
    assert engine.stats["encoder_cache_hits"] == enc_hits + 1


def test_different_images_with_equal_token_ids_share_no_blocks(llms):
    llm = llms("qwen2_vl")
    engine = engine_for(llm, block_size=4)
    a = llm.processor.prepare_chat(user({"type": "image", "image": image(8)}, text("Say.")))
    b = llm.processor.prepare_chat(user({"type": "image", "image": image(9)}, text("Say.")))
    assert a.token_ids == b.token_ids  # same size, so the very same pad tokens
    image_start = a.token_ids.index(llm.config.image_token_id)
    full_blocks = (len(a.token_ids) - 1) // 4  # what a prefix hit may cover at most
    run(engine, [a])
    hits = engine.stats["prefix_cache_hits"]
    out_b = run(engine, [b])[0]
    # only the blocks wholly before the image may be shared
    assert engine.stats["prefix_cache_hits"] - hits == image_start // 4
    plain = engine_for(llm, enable_prefix_caching=False, encoder_cache_memory=0)
    assert out_b == run(plain, [b])[0]
    # the same image again shares every full block
    hits = engine.stats["prefix_cache_hits"]
    run(engine, [a])
    assert engine.stats["prefix_cache_hits"] - hits == full_blocks


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_cpu_decode_kernels_match_the_torch_ops(family, llms, monkeypatch):
    """Decode steps on the CPU go through ``qwenvl.kernels`` (RMSNorm, rotary + paged-cache
    write + attention in one call); their logits are the torch ops' to float32 rounding."""
    from qwenvl import kernels

    if not kernels.available():
        pytest.skip("qwenvl CPU kernels unavailable")
    llm = llms(family)
    prompts = [llm.processor.prepare_chat(c) for c in convs()[:3]]

    def logits_of_every_step() -> list[torch.Tensor]:
        engine = engine_for(llm, enable_prefix_caching=False)
        seen, inner = [], engine.runner.run
        engine.runner.run = lambda *a: seen.append(inner(*a)) or seen[-1]
        run(engine, prompts)
        return seen

    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    fused = logits_of_every_step()
    assert len(calls) >= 9 * llm.model.config.text.num_hidden_layers  # 9+ all-decode steps
    monkeypatch.setattr(kernels, "applies", lambda *t: False)
    plain = logits_of_every_step()
    assert len(fused) == len(plain)
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_abort_returns_every_block(llms):
    llm = llms("qwen2_vl")
    engine = engine_for(llm, block_size=4)
    prompts = [llm.processor.prepare_chat(c) for c in convs()]
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=50)) for p in prompts]
    engine.step()
    engine.step()
    assert engine.blocks.num_free_blocks < engine.blocks.num_blocks
    events = engine.abort(ids[1])
    assert events and all(e.finish_reason == "abort" for e in events)
    for rid in ids:
        engine.abort(rid)
    assert not engine.has_unfinished
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    engine.blocks.check_invariants()


def test_request_that_can_never_fit_is_refused(llms):
    llm = llms("qwen2_vl")
    engine = engine_for(llm, num_kv_blocks=4, block_size=4)  # 16 tokens of KV in all
    prompt = llm.processor.prepare_chat(convs()[0])
    with pytest.raises(PromptError, match=r"KV cache holds 16 tokens"):
        engine.add_request(prompt, GREEDY)
    assert not engine.has_unfinished


def test_async_engine_streams_and_aborts(llms, reference):
    llm = llms("qwen2_vl")
    engine = engine_for(llm)
    prompts = [llm.processor.prepare_chat(c) for c in convs()]
    async_engine = AsyncEngine(engine)

    async def collect(i, p):
        ids = []
        async for e in async_engine.generate(p, GREEDY, f"r{i}"):
            ids.extend(e.token_ids)
        return ids

    async def abandon(p):
        gen = async_engine.generate(p, SamplingParams(temperature=0, max_tokens=500), "gone")
        async for _ in gen:
            break  # the client disconnects after the first event
        await gen.aclose()

    async def main():
        results = await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompts)))
        await abandon(prompts[0])
        with pytest.raises(PromptError):
            async for _ in async_engine.generate(
                prompts[0], SamplingParams(max_tokens=10**6), "too-long"
            ):
                pass
        return results

    try:
        assert asyncio.run(main()) == reference["qwen2_vl"]
        for _ in range(100):  # the abort is applied by the stepping thread
            if not engine.has_unfinished:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert not engine.has_unfinished
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    finally:
        async_engine.close()


def test_oversized_image_is_refused_from_its_header(llms, tmp_path):
    """Too many vision tokens for the context: refused with the numbers, pixels never decoded
    (the file's pixel data is cut off, so decoding would fail with another error)."""
    import io

    from qwenvl import LLM
    from qwenvl.errors import MediaError

    llm = llms("qwen2_vl")
    big = 12845056  # the checkpoint's limit; the CPU default cap is tested below
    small = LLM(
        llm.path, dtype="float32", max_pixels=big, engine_config=EngineConfig(max_model_len=256)
    )
    buf = io.BytesIO()
    Image.new("RGB", (1200, 900), (200, 30, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])  # a valid header, truncated pixels
    conv = user({"type": "image", "image": str(path)}, text("What?"))
    with pytest.raises(PromptError) as err:
        small.chat(conv, SamplingParams(max_tokens=16))
    msg = str(err.value)
    assert "messages[0].content[0]" in msg and "room for at most 240" in msg, msg
    tokens = (1204 // 28) * (896 // 28)  # smart_resize of 1200x900 with factor 28
    assert f"+ {tokens} for" in msg
    with pytest.raises(MediaError, match="truncated or corrupt"):  # the same file, when it fits
        LLM(llm.path, dtype="float32", max_pixels=big).chat(conv, SamplingParams(max_tokens=16))
    assert not small.engine.has_unfinished
    # on the CPU, with no pixel limits given, images are capped at 1024 tokens: 1200x900 is
    # resized by beta = sqrt(1200*900/802816) to floor(900/beta/28)*28 x floor(1200/beta/28)*28
    capped = LLM(llm.path, dtype="float32", engine_config=EngineConfig(max_model_len=256))
    with pytest.raises(PromptError, match=r"\+ 972 for"):  # 27 x 36 tokens
        capped.chat(conv, SamplingParams(max_tokens=16))
