"""Chat completions through a real uvicorn server and the official ``openai`` client."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from server_helpers import (
    API_KEY,
    MODEL,
    data_uri,
    fix_server_text,
    mp4_bytes,
    png_bytes,
    wait_idle,
)

from qwenvl.sampling import SamplingParams


def _image_messages(url: str, text: str = "Describe this image.") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": text},
            ],
        }
    ]


def _stream_text(stream: Any) -> tuple[dict[int, str], list[Any]]:
    texts: dict[int, str] = {}
    chunks = list(stream)
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    return texts, chunks


def test_models_health_and_metrics(server: Any) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.root}/health").status_code == 200
    server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert httpx.get(f"{server.root}/metrics").status_code == 401  # the API key guards it too
    text = httpx.get(f"{server.root}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in (
        "qwenvl_requests_total",
        "qwenvl_prompt_tokens_total",
        "qwenvl_generation_tokens_total",
        "qwenvl_requests_waiting",
        "qwenvl_time_to_first_token_seconds_bucket",
        "qwenvl_vision_tokens_total",
        "qwenvl_engine_encoder_cache_hits",
        "qwenvl_engine_prefix_cache_hits",
    ):
        assert name in text, name
    assert 'qwenvl_requests_total{endpoint="/v1/chat/completions",code="200"}' in text


def test_greedy_equals_llm_chat(server: Any, llms: Any) -> None:
    messages = _image_messages(data_uri(png_bytes()))
    r = server.client().chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=8
    )
    ref = llms("qwen2_vl").chat(messages, SamplingParams(temperature=0, max_tokens=8))[0]
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert r.usage.prompt_tokens == ref.num_prompt_tokens
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # what the model saw (the documented extension)
    seen = r.model_extra["qwenvl"]
    g = ref.images[0]
    assert seen["images"] == [
        {
            "original_width": 64,
            "original_height": 48,
            "resized_width": g.resized_width,
            "resized_height": g.resized_height,
            "tokens": g.num_tokens,
        }
    ]


def test_stream_equals_non_stream_and_include_usage(server: Any, media_server: Any) -> None:
    client = server.client()
    messages = _image_messages(media_server.url("red.png"))
    full = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=8
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, chunks = _stream_text(stream)
    assert texts[0] == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    assert [ch.usage for ch in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    finish = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
    assert finish == [full.choices[0].finish_reason]


def test_raw_sse_format(server: Any) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
    }
    headers = {"Authorization": "Bearer test-key"}
    with httpx.stream(
        "POST", f"{server.base_url}/chat/completions", json=body, headers=headers
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert set(first) >= {"id", "object", "created", "model", "choices"}
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in json.loads(lines[1][6:])  # only with include_usage


def test_two_images_and_local_file(server: Any, media_server: Any, media_dir: Any) -> None:
    content = [
        {"type": "image_url", "image_url": {"url": media_server.url("red.png")}},
        {"type": "image_url", "image_url": {"url": media_server.url("green.png")}},
        {"type": "image_url", "image_url": {"url": (media_dir / "local.png").as_uri()}},
        {"type": "text", "text": "Compare them."},
    ]
    r = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2
    )
    images = r.model_extra["qwenvl"]["images"]
    sizes = [(im["original_width"], im["original_height"]) for im in images]
    assert sizes == [(64, 48), (90, 70), (64, 48)]
    assert r.usage.prompt_tokens > sum(im["tokens"] for im in images)


def test_per_item_options_are_honoured(server: Any) -> None:
    uri = data_uri(png_bytes(size=(200, 100)))
    content = [
        {
            "type": "image_url",
            "image_url": {"url": uri, "resized_height": 56, "resized_width": 112},
        },
        {"type": "image_url", "image_url": {"url": uri}, "max_pixels": 3136},
        {"type": "image_url", "image_url": {"url": uri, "detail": "low"}},
        {"type": "text", "text": "What?"},
    ]
    r = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=1
    )
    a, b, c = r.model_extra["qwenvl"]["images"]
    assert (a["resized_width"], a["resized_height"], a["tokens"]) == (112, 56, 8)
    assert b["resized_width"] * b["resized_height"] <= 3136
    assert c["resized_width"] * c["resized_height"] <= 512 * 512


def test_video_data_uri_and_url(server: Any, media_server: Any) -> None:
    client = server.client()
    for url, opts in (
        (data_uri(mp4_bytes(), "video/mp4"), {"nframes": 4}),
        (media_server.url("clip.mp4"), {"fps": 2.0}),
    ):
        content = [
            {"type": "video_url", "video_url": {"url": url, **opts}},
            {"type": "text", "text": "What happens?"},
        ]
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2
        )
        (video,) = r.model_extra["qwenvl"]["videos"]
        assert video["tokens"] > 0 and video["timestamps"]
        if "nframes" in opts:
            assert len(video["timestamps"]) == 4


def _penalised_greedy(
    hf: Any,
    prompt: list[int],
    eos: set[int],
    max_tokens: int,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> list[int]:
    """Greedy decoding by hand on transformers' logits (a full forward per token, no cache):
    transformers' own RepetitionPenaltyLogitsProcessor over prompt and output, then OpenAI's
    ``logit[t] -= presence * (count[t] > 0) + frequency * count[t]`` over the output."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    out: list[int] = []
    while len(out) < max_tokens and not (out and out[-1] in eos):
        ids = torch.tensor([prompt + out])
        with torch.no_grad():
            scores = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        scores = RepetitionPenaltyLogitsProcessor(repetition)(ids, scores)[0].double()
        for t in set(out):
            scores[t] -= presence + frequency * out.count(t)
        out.append(int(scores.argmax()))
    return out


def test_n_seed_stop_and_penalties(server: Any, llms: Any, hf_models: Any) -> None:
    client = server.client()
    msgs = [{"role": "user", "content": "Count the boxes."}]
    kw: dict[str, Any] = dict(model=MODEL, messages=msgs, max_tokens=8)
    llm = llms("qwen2_vl")  # the server's checkpoint, outside the server
    r = client.chat.completions.create(**kw, n=2, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    ref = llm.chat(msgs, SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=8))[0]
    assert [c.message.content for c in r.choices] == [o.text for o in ref.outputs]
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)
    assert r.usage.prompt_tokens == ref.num_prompt_tokens
    again = client.chat.completions.create(**kw, n=2, temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    # streamed n=2 keeps the choices apart
    texts, _ = _stream_text(
        client.chat.completions.create(**kw, n=2, temperature=1.0, seed=7, stream=True)
    )
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]
    # stop: cut the greedy reply at a string it contains
    greedy = client.chat.completions.create(**kw, temperature=0).choices[0].message.content
    stop = next(greedy[i : i + 2] for i in range(1, len(greedy) - 1) if greedy[i : i + 2].strip())
    cut = client.chat.completions.create(**kw, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == greedy[: greedy.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # Penalties: each changes the greedy reply, exactly as greedy decoding by hand on
    # transformers' logits with the penalty applied predicts. Presence -2 with frequency 1.5
    # favours a token seen once (+0.5) but not one seen twice (-1): it tells the two apart.
    hf, eos = hf_models("qwen2_vl"), set(llm.eos_token_ids)
    prompt = llm.processor.prepare_chat(msgs).token_ids
    n = 12  # (greedy "Count the boxes." repeats a token within 10)
    plain = _penalised_greedy(hf, prompt, eos, n)
    assert len(set(plain)) < len(plain)
    for body, pen in (
        ({"extra_body": {"repetition_penalty": 1.5}}, dict(repetition=1.5)),
        ({"presence_penalty": 0.5}, dict(presence=0.5)),
        ({"frequency_penalty": 0.5}, dict(frequency=0.5)),
        ({"presence_penalty": -2.0, "frequency_penalty": 1.5}, dict(presence=-2.0, frequency=1.5)),
    ):
        want = _penalised_greedy(hf, prompt, eos, n, **pen)
        assert want != plain, pen
        got = client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=n, temperature=0, **body
        )
        assert got.choices[0].message.content == llm.tokenizer.decode(want, True), pen
        assert got.usage.completion_tokens == len(want), pen
    swapped = _penalised_greedy(hf, prompt, eos, n, presence=1.5, frequency=-2.0)
    assert swapped != _penalised_greedy(hf, prompt, eos, n, presence=-2.0, frequency=1.5)
    # sampling with the extensions (top_k, repetition_penalty) and OpenAI's penalties and
    # max_completion_tokens: the same tokens as the Python API with the same params and seed
    sampled = dict(temperature=0.8, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5)
    r = client.chat.completions.create(
        **kw,
        **sampled,
        seed=11,
        max_completion_tokens=4,
        extra_body={"top_k": 5, "repetition_penalty": 1.1},
    )
    ref = llm.chat(
        msgs, SamplingParams(**sampled, top_k=5, repetition_penalty=1.1, seed=11, max_tokens=4)
    )[0].outputs[0]
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == len(ref.token_ids) == 4
    unfiltered = llm.chat(
        msgs, SamplingParams(**sampled, repetition_penalty=1.1, seed=11, max_tokens=4)
    )[0].outputs[0]
    assert unfiltered.token_ids != ref.token_ids  # top_k matters for this seed


def test_logprobs(server: Any) -> None:
    r = server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        temperature=0,
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the best
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    stream = server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        temperature=0,
        max_tokens=4,
        logprobs=True,
        stream=True,
    )
    streamed = [
        e.logprob for ch in stream for c in ch.choices if c.logprobs for e in c.logprobs.content
    ]
    assert streamed == pytest.approx([e.logprob for e in content])


def test_blog_example_runs_unchanged(
    server: Any, media_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Qwen2-VL / Qwen2.5-VL README example for an OpenAI-compatible server (vLLM), with
    only base_url, api_key and the model name changed."""
    engine = server.state.engine
    generate = type(engine).generate
    seen: list[tuple[Any, SamplingParams, list[int], list[str]]] = []

    async def recorded(prompt: Any, params: Any, request_id: str) -> Any:
        tokens: list[int] = []
        texts: list[str] = []
        seen.append((prompt, params, tokens, texts))
        async for event in generate(engine, prompt, params, request_id):
            tokens.extend(event.token_ids)
            texts.append(event.text)
            yield event

    monkeypatch.setattr(engine, "generate", recorded)

    from openai import OpenAI

    openai_api_key = "test-key"
    openai_api_base = server.base_url
    client = OpenAI(api_key=openai_api_key, base_url=openai_api_base)

    encoded_image = base64.b64encode(png_bytes((200, 100, 50)))
    encoded_image_text = encoded_image.decode("utf-8")
    base64_qwen = f"data:image;base64,{encoded_image_text}"
    image_url = media_server.url("blue.jpg")

    chat_response = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": base64_qwen}},
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": "What are the differences between these images?"},
                ],
            },
        ],
        temperature=0.7,
        top_p=0.8,
        max_tokens=64,
        extra_body={"repetition_penalty": 1.05},
        stream=True,
        stream_options={"include_usage": True},
    )
    reply, usage = "", None
    for chunk in chat_response:
        if chunk.choices and chunk.choices[0].delta.content:
            reply += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    # The engine got the example's sampling options and both images ...
    ((prompt, params, tokens, texts),) = seen
    assert (params.temperature, params.top_p, params.repetition_penalty) == (0.7, 0.8, 1.05)
    assert params.max_tokens == 64 and params.n == 1
    # by hand: 64x48 -> 56x56 (2x2 merged patches), 80x60 -> 84x56 (3x2)
    sizes = [(g.original_width, g.original_height) for g in prompt.image_geometries]
    resized = [(g.resized_width, g.resized_height, g.num_tokens) for g in prompt.image_geometries]
    assert sizes == [(64, 48), (80, 60)] and resized == [(56, 56, 4), (84, 56, 6)]
    image_pad = server.llm.config.image_token_id
    assert prompt.token_ids.count(image_pad) == 10
    text = server.llm.tokenizer.decode(prompt.token_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert text.count("<|vision_start|>") == 2
    assert "What are the differences between these images?<|im_end|>" in text
    # ... and the client got every token it generated, counted in the usage chunk
    assert usage is not None and usage.prompt_tokens == len(prompt.token_ids)
    assert usage.completion_tokens == len(tokens) and 0 < len(tokens) <= 64
    assert reply == "".join(texts)


def test_grounding_in_original_pixels(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (
        "<|object_ref_start|>the box<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|>"
    )
    fix_server_text(monkeypatch, server, text)
    messages = _image_messages(data_uri(png_bytes(size=(200, 100))), "Find the box.")
    r = server.client().chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, extra_body={"qwenvl": {"grounding": True}}
    )
    (g,) = r.model_extra["qwenvl"]["grounding"]
    (box,) = g["objects"]
    # Qwen2-VL boxes are in 0..1000 of the image: (100,200),(500,600) on 200x100 pixels
    assert (box["kind"], box["label"]) == ("box", "the box")
    assert [box["x1"], box["y1"], box["x2"], box["y2"]] == pytest.approx([20, 20, 100, 60], abs=1)
    stream = server.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=2,
        stream=True,
        extra_body={"qwenvl": {"grounding": True}},
    )
    extras = [ch.model_extra.get("qwenvl") for ch in stream]
    assert extras[0]["images"][0]["original_width"] == 200
    assert extras[-1]["grounding"][0]["objects"] == g["objects"]


def test_client_disconnect_aborts(server: Any) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": "Bearer test-key"}
    before = server.llm.engine.stats["free_blocks"]
    aborted = server.state.metrics.aborted
    with httpx.stream(
        "POST", f"{server.base_url}/chat/completions", json=body, headers=headers
    ) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    wait_idle(server)
    assert server.llm.engine.stats["free_blocks"] >= before
    # a non-streamed request whose client gives up is aborted too
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/chat/completions", json=body, headers=headers, timeout=0.5)
    wait_idle(server)
    assert server.state.metrics.aborted >= aborted + 1
    assert server.llm.engine.stats["free_blocks"] >= before


def test_completions_endpoint(server: Any, llms: Any) -> None:
    client = server.client()
    llm = llms("qwen2_vl")  # the server's checkpoint, outside the server
    for params in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=3)):
        r = client.completions.create(model=MODEL, prompt="The red box", max_tokens=6, **params)
        (ref,) = llm.generate("The red box", SamplingParams(max_tokens=6, **params))
        assert r.choices[0].text == ref.outputs[0].text, params
        assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
        assert r.usage.prompt_tokens == ref.num_prompt_tokens
        assert r.usage.completion_tokens == len(ref.outputs[0].token_ids) == 6
        stream = client.completions.create(
            model=MODEL, prompt="The red box", max_tokens=6, stream=True, **params
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text
    # a raw prompt is continued as is, with no chat template around it
    assert ref.prompt_token_ids == llm.tokenizer.encode("The red box")


def test_preprocessing_does_not_block_other_requests(server: Any, media_server: Any) -> None:
    import threading

    media_server.release.clear()
    result: dict[str, Any] = {}

    def slow() -> None:
        result["r"] = server.client().chat.completions.create(
            model=MODEL, messages=_image_messages(media_server.url("slow.png")), max_tokens=1
        )

    t = threading.Thread(target=slow)
    t.start()
    try:
        r = server.client(timeout=10).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert r.choices[0].message.content is not None
        assert t.is_alive()  # the slow download is still running
    finally:
        media_server.release.set()
        t.join(20)
    assert result["r"].usage.prompt_tokens > 0
