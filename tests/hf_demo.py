"""Transformers' greedy answers on demo samples, built only from its own pieces (tokenizer, chat
template, image processor) and a checkpoint folder's files: the reference the demo checkpoint
tests compare ``LLM`` with."""

from __future__ import annotations

import json
import warnings

import torch

# the released Qwen2.5-VL checkpoint's file set, which the demo checkpoint must have exactly
RELEASED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def hf_generate(folder, samples, max_new_tokens: int) -> list[tuple[list[int], list[int]]]:
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
    merge = model.config.vision_config.spatial_merge_size**2
    answers = []
    for s in samples:
        text = tok.apply_chat_template(
            s.messages(with_answer=False),
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        pix = proc(images=s.images, return_tensors="pt")
        parts = text.split("<|image_pad|>")
        assert len(parts) == len(s.images) + 1
        expanded = parts[0]
        for grid, rest in zip(pix["image_grid_thw"], parts[1:]):
            expanded += "<|image_pad|>" * (int(grid.prod()) // merge) + rest
        ids = tok(expanded, return_tensors="pt")
        # what Qwen2_5_VLProcessor adds (it needs torchvision to import): the token types
        image_id = tok.convert_tokens_to_ids("<|image_pad|>")
        ids["mm_token_type_ids"] = (ids["input_ids"] == image_id).long()
        with torch.no_grad():
            gen = model.generate(
                **ids,
                pixel_values=pix["pixel_values"],
                image_grid_thw=pix["image_grid_thw"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        prompt = ids["input_ids"][0].tolist()
        answers.append((prompt, gen[0, len(prompt) :].tolist()))
    return answers
