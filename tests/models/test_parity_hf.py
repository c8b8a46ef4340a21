"""Numerical parity with transformers 5.23 (the reference implementation) on tiny checkpoints, fp32.

Independent truth for every number: the transformers model loaded from the same folder, fed pixels
from transformers' own ``Qwen2VLImageProcessorPil``. Videos: transformers >= 5.3 continues text
after a video at a different position than the released models were trained with; the
logits tests hand transformers our reference positions explicitly, and the generation tests switch
to transformers' own position rule (``HFPositions``) — never a looser tolerance.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl import SamplingParams
from scoring import prompt_logits

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
LOGIT_TOL = 1e-4


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def video_frames(n: int, seed: int) -> list[Image.Image]:
    return [noise_image(84, 56, seed + i) for i in range(n)]


def text_msg(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def image_msg(*sizes: tuple[int, int], seed: int = 1) -> list[dict]:
    items = [
        {"type": "image", "image": noise_image(w, h, seed + i)} for i, (w, h) in enumerate(sizes)
    ]
    return [{"role": "user", "content": [*items, {"type": "text", "text": "Describe this image."}]}]


def video_msg(frames: int = 8, fps: float = 2.0, with_image: bool = False) -> list[dict]:
    items = []
    if with_image:
        items.append({"type": "image", "image": noise_image(70, 100, 7)})
    items.append(
        {
            "type": "video",
            "video": video_frames(frames, 20),
            "fps": fps,
            "min_pixels": 56 * 84,
            "max_pixels": 56 * 84,
        }
    )
    return [{"role": "user", "content": [*items, {"type": "text", "text": "What happens?"}]}]


CASES = {
    "text": lambda: [text_msg("Count the boxes in the picture.")],
    "one_image": lambda: [image_msg((70, 100))],
    "two_images": lambda: [image_msg((70, 100), (200, 150), seed=3)],
    "video": lambda: [video_msg()],
    "video_0.5s": lambda: [video_msg(fps=4.0)],  # second_per_grid_t 0.5
    "video_1.7s": lambda: [video_msg(fps=2 / 1.7)],  # second_per_grid_t 1.7
    "batch": lambda: [
        text_msg("hi"),
        image_msg((70, 100)),
        image_msg((70, 100), (200, 150), seed=3),
        video_msg(with_image=True),
    ],
}


def hf_inputs(llm, prompts, conversations):
    """transformers inputs for our prompts: left-padded ids, HF-processed pixels, token types."""
    from transformers import Qwen2VLImageProcessorPil

    cfg = llm.config
    width = max(len(p.token_ids) for p in prompts)
    ids = torch.full((len(prompts), width), llm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p.token_ids) :] = torch.tensor(p.token_ids)
        mask[b, width - len(p.token_ids) :] = 1
    types = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
    inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
    images = [
        item["image"]
        for conv in conversations
        for m in conv
        if isinstance(m["content"], list)
        for item in m["content"]
        if item.get("type") == "image"
    ]
    if images:
        proc = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
        out = proc(images=images, return_tensors="pt")
        ours = torch.cat([im.pixel_values for p in prompts for im in p.images])
        assert torch.equal(out["pixel_values"], ours), "preprocessing differs from the reference"
        inputs["pixel_values"] = out["pixel_values"]
        inputs["image_grid_thw"] = out["image_grid_thw"]
    videos = [v for p in prompts for v in p.videos]
    if videos:
        inputs["pixel_values_videos"] = torch.cat([v.pixel_values for v in videos])
        inputs["video_grid_thw"] = torch.tensor([v.grid_thw for v in videos])
        if cfg.vision.tokens_per_second is not None:  # Qwen2.5-VL's time-aligned videos
            inputs["second_per_grid_ts"] = torch.tensor([v.second_per_grid_t for v in videos])
    return inputs


def padded_positions(prompts, width):
    pos = torch.zeros(3, len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        pos[:, b, width - len(p.token_ids) :] = p.positions
    return pos


class HFPositions:
    """A family whose M-RoPE positions are transformers' own (``get_rope_index``: what
    ``generate`` computes; after a video it continues at ``cur + max(h, w)``, not at the trained
    rule's largest position + 1)."""

    def __init__(self, family, hf) -> None:
        self.family, self.hf = family, hf

    def __getattr__(self, name):
        return getattr(self.family, name)

    def positions(self, config, token_ids, image_grids, video_grids, video_seconds):
        ids = torch.tensor([list(token_ids)])
        types = torch.zeros_like(ids, dtype=torch.int)
        types[ids == config.image_token_id] = 1
        types[ids == config.video_token_id] = 2
        kw = {}
        if "second_per_grid_ts" in inspect.signature(self.hf.model.get_rope_index).parameters:
            kw["second_per_grid_ts"] = torch.tensor(list(video_seconds)) if video_grids else None
        pos, delta = self.hf.model.get_rope_index(
            ids,
            types,
            image_grid_thw=torch.tensor(list(image_grids)) if image_grids else None,
            video_grid_thw=torch.tensor(list(video_grids)) if video_grids else None,
            **kw,
        )
        return pos[:, 0], int(delta.reshape(-1)[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_features_match(family, llms, hf_models):
    llm, hf = llms(family), hf_models(family)
    # multi-window, exact multiples of the window, several frames, the smallest grid
    grids = [(1, 18, 14), (2, 16, 20), (1, 8, 8), (3, 4, 36), (1, 2, 2)]
    n = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n, 3 * 2 * 14 * 14)
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
        ours = llm.model.encode_vision(pixels, grids)
    diff = (ref - ours).abs().max().item()
    print(f"{family} vision max abs diff {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match(family, case, llms, hf_models):
    llm, hf = llms(family), hf_models(family)
    conversations = CASES[case]()
    prompts = [llm.processor.prepare_chat(c) for c in conversations]
    inputs = hf_inputs(llm, prompts, conversations)
    if prompts[0].videos or any(p.videos for p in prompts):
        # our reference (trained) positions, handed to transformers explicitly
        inputs["position_ids"] = padded_positions(prompts, inputs["input_ids"].shape[1])
    with torch.no_grad():
        ref = hf(**inputs).logits
    ours, valid = prompt_logits(llm.model, prompts, llm.tokenizer.pad_token_id)
    diff = (ref - ours)[valid].abs().max().item()
    print(f"{family} {case} logits max abs diff {diff:.2e}")
    assert diff <= LOGIT_TOL


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches(family, case, llms, hf_models, monkeypatch):
    llm, hf = llms(family), hf_models(family)
    conversations = CASES[case]()
    if case.startswith("video") or case == "batch":  # what transformers.generate computes
        monkeypatch.setattr(llm.processor, "family", HFPositions(llm.processor.family, hf))
    prompts = [llm.processor.prepare_chat(c) for c in conversations]
    inputs = hf_inputs(llm, prompts, conversations)
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ref = ref[:, inputs["input_ids"].shape[1] :]
    outs = llm.chat(
        conversations,
        SamplingParams(temperature=0, max_tokens=16, min_tokens=16, repetition_penalty=1.0),
    )
    for b, out in enumerate(outs):
        assert out.outputs[0].token_ids == ref[b].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_after_video_follows_the_reference_rule(family, llms):
    """Our default continues after a video at max position + 1 (trained rule), not HF 5.x's."""
    llm = llms(family)
    prompt = llm.processor.prepare_chat(video_msg())
    ids = torch.tensor(prompt.token_ids)
    last_video = int((ids == llm.config.video_token_id).nonzero().max())
    block = prompt.positions[:, : last_video + 1]
    assert int(prompt.positions[0, last_video + 1]) == int(block.max()) + 1
