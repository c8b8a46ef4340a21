"""The demo model's shape, tokenizer and a freshly initialised checkpoint in the released layout.

A Qwen2.5-VL of the exact architecture, scaled down: a 6-layer, 192-wide ViT (window attention,
RMSNorm, SwiGLU, 2x2 merger) and a 4-layer, 256-wide Qwen2.5 decoder with M-RoPE. ``rope_theta``
is 50, not the released 1e6: with head_dim 64 the height and width streams would otherwise barely
rotate across an 8x8-token image and positions (grounding) could not be read.
"""

from __future__ import annotations

import json
import random
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from qwenvl.demo.tasks import MAX_PIXELS, MIN_PIXELS, MODEL_TYPE, TASKS, sample_at
from qwenvl.models import family_of, read_config
from qwenvl.processing.image import VisionPreprocessConfig
from qwenvl.tokenizer import save_tokenizer_files, train_qwen_style_tokenizer
from qwenvl.train.checkpoint import _save_sharded

CHAT_TEMPLATE = files("qwenvl").joinpath("data/qwen2_vl_chat_template.jinja").read_text()
BPE_SIZE = 400  # before the 22 Qwen added tokens
VOCAB_SIZE = 448  # rows of the embedding (the released models also keep spare rows)

VISION = {
    "depth": 6,
    "hidden_size": 192,
    "num_heads": 3,
    "intermediate_size": 512,
    "out_hidden_size": 256,
    "fullatt_block_indexes": [2, 5],
    "window_size": 112,
    "tokens_per_second": 2,
    "hidden_act": "silu",
    "patch_size": 14,
    "spatial_patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
    "in_chans": 3,
    "model_type": MODEL_TYPE,
    "initializer_range": 0.02,
}
TEXT = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_theta": 50.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
}


def corpus(count: int = 3000, seed: int = 12345) -> list[str]:
    """Text the tokenizer is trained on: every task's questions and answers, and the template."""
    texts = ["You are a helpful assistant.", "system user assistant Picture Video"]
    for i in range(count):
        s = sample_at(seed, i, TASKS)
        texts += [s.question, s.answer]
    return texts


def config_dict(tok: Any) -> dict[str, Any]:
    """``config.json`` in the released (flat) Qwen2.5-VL layout."""
    ids = {
        name: tok.token_to_id(t)
        for name, t in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
            ("bos_token_id", "<|endoftext|>"),
            ("eos_token_id", "<|im_end|>"),
            ("pad_token_id", "<|endoftext|>"),
        )
    }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        **ids,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_window_layers": 4,
        "sliding_window": None,
        "use_sliding_window": False,
        "use_cache": True,
        "tie_word_embeddings": True,
        "vocab_size": VOCAB_SIZE,
        **TEXT,
        "vision_config": VISION,
        "torch_dtype": "float32",
        "transformers_version": "4.49.0",
    }


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """GPT-style init: normal(0, std) matrices (the patch embedding's too), zero biases, unit
    norms."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.ones_(p)


def write_files(folder: str | Path) -> Path:
    """Everything but the weights: tokenizer, template, configs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_qwen_style_tokenizer(corpus(), vocab_size=BPE_SIZE)
    if tok.get_vocab_size() > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens > {VOCAB_SIZE}")
    save_tokenizer_files(tok, folder, chat_template=CHAT_TEMPLATE)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (folder / "config.json").write_text(json.dumps(config_dict(tok), indent=2))
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (folder / "generation_config.json").write_text(
        json.dumps(
            {
                "eos_token_id": eos,
                "pad_token_id": eos[1],
                "do_sample": False,
                "temperature": 0.0,
                "max_new_tokens": 256,
            },
            indent=2,
        )
    )
    vision = VisionPreprocessConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(vision.to_hf("Qwen2_5_VLProcessor"), indent=2)
    )
    return folder


def new_model(folder: str | Path, seed: int = 0) -> nn.Module:
    """A freshly initialised model of the demo shape (fp32)."""
    cfg = read_config(Path(folder) / "config.json")
    torch.manual_seed(seed)
    random.seed(seed)
    model = family_of(cfg).build(cfg)
    init_weights(model)
    return model


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """The weights of a model folder written by ``save_weights`` (any dtype), into ``model``."""
    tensors = load_file(str(Path(folder) / "model.safetensors"))
    state = model.state_dict()
    missing = set(state) - set(tensors) - {"lm_head.weight"}  # tied to the embedding
    unknown = set(tensors) - set(state)
    if missing or unknown:
        raise ValueError(f"{folder}: missing {sorted(missing)}, unexpected {sorted(unknown)}")
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=False)


def save_weights(model: nn.Module, folder: str | Path, dtype: torch.dtype | None = None) -> None:
    """``model.safetensors`` in the released tensor names (tied lm_head not written)."""
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        t = t.detach().cpu()
        tensors[name] = (
            t.to(dtype) if dtype is not None and t.is_floating_point() else t
        ).contiguous()
    _save_sharded(tensors, Path(folder))
