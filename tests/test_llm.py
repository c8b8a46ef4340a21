"""The Python API on tiny checkpoints: batching, streaming, stop rules, seeds, defaults, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl import SamplingParams
from qwenvl.errors import MediaError, PromptError
from scoring import prompt_logits

GREEDY = dict(temperature=0, repetition_penalty=1.0)


def image(seed: int, w: int = 70, h: int = 100) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def convs():
    return [
        [{"role": "user", "content": "hello there"}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image(1)},
                    {"type": "text", "text": "Describe."},
                ],
            }
        ],
        [
            {"role": "system", "content": "You are terse."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": image(2, 200, 150)},
                    {"type": "image_url", "image_url": {"url": image(3)}},
                    {"type": "text", "text": "Compare."},
                ],
            },
        ],
        [
            {
                "role": "user",
                "content": [
                    {
                        "type": "video",
                        "video": [image(i, 84, 56) for i in range(4)],
                        "max_pixels": 56 * 84,
                    },
                    {"type": "text", "text": "What happens?"},
                ],
            }
        ],
    ]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_batch_equals_single(family, llms):
    llm = llms(family)
    params = SamplingParams(max_tokens=12, min_tokens=12, **GREEDY)
    batched = llm.chat(convs(), params)
    for conv, out in zip(convs(), batched):
        alone = llm.chat(conv, params)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
        assert alone.prompt_token_ids == out.prompt_token_ids


def test_kv_cache_matches_full_recompute(llms):
    """Greedy decoding with the cache equals argmax of a full forward over prompt + output."""
    llm = llms("qwen2_5_vl")
    conv = convs()[1]
    out = llm.chat(conv, SamplingParams(max_tokens=8, min_tokens=8, **GREEDY))[0].outputs[0]
    prompt = llm.processor.prepare_chat(conv)
    for k in range(len(out.token_ids)):
        p = llm.processor.prepare_chat(conv)
        p.token_ids = prompt.token_ids + out.token_ids[:k]
        extra = torch.arange(k) + len(prompt.token_ids) + prompt.rope_delta
        p.positions = torch.cat([prompt.positions, extra.expand(3, k)], dim=1)
        logits, _ = prompt_logits(llm.model, [p])
        assert int(logits[0, -1].argmax()) == out.token_ids[k]


def test_streaming_equals_non_streamed(llms):
    llm = llms("qwen2_vl")
    params = SamplingParams(max_tokens=20, **GREEDY)
    full = llm.chat(convs()[1], params)[0].outputs[0]
    events = list(llm.stream_chat(convs()[1], params))
    assert "".join(e.text for e in events) == full.text
    assert [t for e in events for t in e.token_ids] == full.token_ids
    assert events[-1].finish_reason == full.finish_reason


def test_stop_strings_and_tokens(llms):
    llm = llms("qwen2_vl")
    base = llm.chat(convs()[0], SamplingParams(max_tokens=24, min_tokens=24, **GREEDY))[0].outputs[
        0
    ]
    text = base.text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text[i : i + 2].strip())
    cut = text.index(stop)
    out = llm.chat(convs()[0], SamplingParams(max_tokens=24, stop=[stop], **GREEDY))[0].outputs[0]
    assert out.text == text[:cut]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    keep = llm.chat(
        convs()[0],
        SamplingParams(max_tokens=24, stop=stop, include_stop_str_in_output=True, **GREEDY),
    )[0].outputs[0]
    assert keep.text == text[: cut + len(stop)]
    streamed = "".join(
        e.text
        for e in llm.stream_chat(convs()[0], SamplingParams(max_tokens=24, stop=[stop], **GREEDY))
    )
    assert streamed == out.text  # the stop string never leaks into the stream

    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = llm.chat(convs()[0], SamplingParams(max_tokens=24, stop_token_ids=[stop_id], **GREEDY))[0]
    assert out.outputs[0].token_ids == base.token_ids[: first + 1]
    assert out.outputs[0].stop_reason == stop_id


def test_max_tokens_and_eos(llms, checkpoints, tmp_path):
    from qwenvl import LLM

    llm = llms("qwen2_vl")
    out = llm.chat(convs()[0], SamplingParams(max_tokens=5, min_tokens=5, **GREEDY))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    # The tiny model never writes its own EOS (<|im_end|>, <|endoftext|>) within 24 tokens ...
    long = llm.chat(convs()[0], SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0]
    assert long.finish_reason == "length" and len(long.token_ids) == 24
    assert not set(long.token_ids) & set(llm.eos_token_ids)
    assert long.token_ids[:5] == out.token_ids
    # ... so a copy of the checkpoint names, in generation_config.json, the token greedy decoding
    # writes first at step k as its EOS: generation must end right there, and nowhere earlier.
    k = next(i for i in range(3, 24) if long.token_ids[i] not in long.token_ids[:i])
    eos_id = long.token_ids[k]
    folder = shutil.copytree(checkpoints("qwen2_vl"), tmp_path / "ckpt")
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [eos_id]}))
    eos_llm = LLM(folder, dtype="float32")
    assert eos_id in eos_llm.eos_token_ids
    stopped = eos_llm.chat(convs()[0], SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0]
    assert stopped.token_ids == long.token_ids[: k + 1]  # EOS included, nothing after it
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", None)  # vLLM: EOS has none
    assert stopped.text == llm.tokenizer.decode(long.token_ids[:k])  # EOS itself is not text
    streamed = list(eos_llm.stream_chat(convs()[0], SamplingParams(max_tokens=24, **GREEDY)))
    assert [t for e in streamed for t in e.token_ids] == stopped.token_ids
    assert streamed[-1].finish_reason == "stop"
    # ignore_eos runs past it; min_tokens keeps EOS from ending the reply before k + 2 tokens
    ignored = eos_llm.chat(convs()[0], SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY))[
        0
    ].outputs[0]
    assert ignored.token_ids == long.token_ids and ignored.finish_reason == "length"
    late = eos_llm.chat(convs()[0], SamplingParams(max_tokens=24, min_tokens=k + 2, **GREEDY))[
        0
    ].outputs[0]
    assert late.token_ids[:k] == long.token_ids[:k] and len(late.token_ids) >= k + 2
    assert eos_id not in late.token_ids[: k + 2]
    assert late.finish_reason == "length" or late.token_ids.index(eos_id) == len(late.token_ids) - 1


def test_seeds_and_n(llms):
    llm = llms("qwen2_5_vl")
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=7, n=3)
    a = llm.chat(convs()[1], params)[0]
    b = llm.chat(convs()[1], params)[0]
    assert len(a.outputs) == 3 and [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    # the seeded request is reproducible inside a batch of other (unseeded) requests
    mixed = llm.chat(
        [convs()[0], convs()[1]],
        [SamplingParams(temperature=1.0, max_tokens=10), params],
    )
    assert [o.token_ids for o in mixed[1].outputs] == [o.token_ids for o in a.outputs]


def test_defaults_come_from_generation_config(llms):
    llm = llms("qwen2_vl")  # the tiny generation_config says do_sample=false
    assert llm.default_sampling.temperature == 0
    default = llm.chat(convs()[0])[0].outputs[0]
    greedy = llm.chat(convs()[0], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert default.token_ids == greedy.token_ids


def test_logprobs(llms):
    llm = llms("qwen2_vl")
    out = llm.chat(convs()[0], SamplingParams(max_tokens=4, logprobs=3, **GREEDY))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert len(entry) == 3 and tok in entry
        assert entry[tok] == max(entry.values())  # greedy picks the most likely token
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t] for t, e in zip(out.token_ids, out.logprobs))
    )


def test_generate_raw_prompt_equals_chat(llms):
    llm = llms("qwen2_vl")
    conv = convs()[1]
    text = llm.processor.render(conv)
    params = SamplingParams(max_tokens=8, **GREEDY)
    raw = llm.generate({"prompt": text, "multi_modal_data": {"image": [image(1)]}}, params)[0]
    chat = llm.chat(conv, params)[0]
    assert raw.prompt_token_ids == chat.prompt_token_ids
    assert raw.outputs[0].token_ids == chat.outputs[0].token_ids
    assert raw.images[0].original_width == 70 and raw.images[0].resized_width == 56


def test_tools_reach_the_prompt(llms):
    llm = llms("qwen2_vl")
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    out = llm.chat(convs()[0], SamplingParams(max_tokens=2, **GREEDY), tools=tools)[0]
    assert '"name": "get_weather"' in out.prompt and "<tools>" in out.prompt


def test_context_overflow_is_a_clear_error(llms):
    llm = llms("qwen2_vl")
    with pytest.raises(PromptError, match=r"context holds 4096"):
        llm.chat(convs()[0], SamplingParams(max_tokens=5000))


def test_bad_media_names_the_item(llms, tmp_path):
    llm = llms("qwen2_vl")
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "x"},
                {"type": "image", "image": str(tmp_path / "no.png")},
            ],
        }
    ]
    with pytest.raises(MediaError, match=r"messages\[0\].content\[1\]"):
        llm.chat(conv)
    with pytest.raises(PromptError):
        llm.chat([{"role": "user"}])


def test_grounding_uses_the_recorded_geometry(llms):
    """The processor's geometry reaches result.grounding(): a box in resized pixels (Qwen2.5-VL)
    maps back to original pixels."""
    llm = llms("qwen2_5_vl")
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image(4, 1001, 333)},
                {"type": "text", "text": "x"},
            ],
        }
    ]
    out = llm.chat(conv, SamplingParams(max_tokens=1, **GREEDY))[0]
    geo = out.images[0]
    assert (geo.original_width, geo.original_height) == (1001, 333)
    assert (geo.resized_width, geo.resized_height) == (1008, 336)
    out.outputs[0].text = '```json\n[{"bbox_2d": [0, 0, 504, 168], "label": "left half"}]\n```'
    (box,) = out.grounding()
    assert (box.x1, box.y1, box.label) == (0, 0, "left half")
    assert box.x2 == pytest.approx(500.5) and box.y2 == pytest.approx(166.5)


def test_video_file_in_chat(llms, tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):  # 2 seconds
            frame = av.VideoFrame.from_ndarray(
                np.full((48, 64, 3), i * 12, np.uint8), format="rgb24"
            )
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    llm = llms("qwen2_5_vl")
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(path), "max_pixels": 56 * 84},
                {"type": "text", "text": "x"},
            ],
        }
    ]
    prompt = llm.processor.prepare_chat(conv)
    (video,) = prompt.videos
    assert video.metadata.frame_indices == [
        0,
        6,
        13,
        19,
    ]  # 2 fps over 20 frames: linspace(0, 19, 4)
    assert video.second_per_grid_t == pytest.approx(2 / (4 / 20 * 10))
    assert prompt.token_ids.count(llm.config.video_token_id) == video.num_tokens
    out = llm.chat(conv, SamplingParams(max_tokens=3, **GREEDY))[0]
    assert len(out.outputs[0].token_ids) >= 1
