"""Tiny random-weight checkpoints of both families, built offline with transformers (the oracle).

A checkpoint folder has the released file set: config.json (flat like the hub, or nested like
transformers 5.x writes), generation_config.json, safetensors (single or sharded, released or 5.x
tensor names), preprocessor_config.json, chat_template.json, tokenizer.json, tokenizer_config.json.
"""

from __future__ import annotations

import json
import warnings
from importlib.resources import files
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwenvl.processing.image import VisionPreprocessConfig
from qwenvl.tokenizer import save_tokenizer_files, train_qwen_style_tokenizer

CHAT_TEMPLATE = files("qwenvl").joinpath("data/qwen2_vl_chat_template.jinja").read_text()

CORPUS = [
    "You are a helpful assistant.",
    "Describe this image. What is in the picture? Count the boxes.",
    "The red box is on the left and the blue box is on the right.",
    "Output the color and number of each box.",
    "system user assistant Picture Video",
    "我们看到一个红色的盒子。 emoji 🙂 test",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
] * 4

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
)
MROPE = [2, 3, 3]


def tiny_tokenizer():
    return train_qwen_style_tokenizer(CORPUS, vocab_size=400)


def hf_config(family: str, tok, tie: bool = False, text: dict | None = None):
    """A transformers config of the tiny shape with the tokenizer's special ids (``text``:
    fields of the text config to change, ``mrope_section`` among them)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {
        "image_token_id": tok.token_to_id("<|image_pad|>"),
        "video_token_id": tok.token_to_id("<|video_pad|>"),
        "vision_start_token_id": tok.token_to_id("<|vision_start|>"),
        "vision_end_token_id": tok.token_to_id("<|vision_end|>"),
    }
    text = dict(TEXT, **(text or {}))
    mrope = text.pop("mrope_section", MROPE)
    text = dict(
        text,
        vocab_size=tok.get_vocab_size() + 10,  # like the released models: rows past the tokenizer
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
    )
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)
    vision = dict(
        depth=4,
        hidden_size=32,
        num_heads=2,
        intermediate_size=48,
        out_hidden_size=64,
        fullatt_block_indexes=[1, 3],
        window_size=112,
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)


def hf_model_class(family: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    return (
        Qwen2VLForConditionalGeneration
        if family == "qwen2_vl"
        else Qwen2_5_VLForConditionalGeneration
    )


def flatten_config(nested: dict) -> dict:
    """Rewrite a 5.x nested config.json in the released (flat, 4.x) layout."""
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    for k in ("model_type", "layer_types", "dtype"):
        text.pop(k, None)
    flat.update(text)
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = dict(flat["vision_config"])
    vision.pop("rope_parameters", None)
    vision["model_type"] = nested["model_type"]  # the released files carry the top-level type
    vision["in_chans"] = vision.get("in_channels", 3)
    vision["spatial_patch_size"] = vision.get("patch_size", 14)
    flat["vision_config"] = vision
    flat["torch_dtype"] = "float32"
    flat["transformers_version"] = "4.41.2"
    flat.pop("dtype", None)
    return flat


def build_checkpoint(
    out: Path,
    family: str = "qwen2_vl",
    *,
    layout: str = "flat",
    names: str = "released",
    sharded: bool = False,
    tie: bool = False,
    seed: int = 0,
    text: tuple[tuple[str, object], ...] = (),
) -> Path:
    """Write a tiny checkpoint folder; returns it. Same seed -> same weights in every layout."""
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    save_tokenizer_files(tok, out, chat_template=CHAT_TEMPLATE)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    config = hf_config(family, tok, tie, dict(text))
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf_model_class(family)(config).eval()
        model.save_pretrained(out, max_shard_size="60KB" if sharded else "10GB")
    nested = json.loads((out / "config.json").read_text())
    if layout == "flat":
        (out / "config.json").write_text(json.dumps(flatten_config(nested), indent=2))
    if names == "v5":
        _rename_to_v5(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(VisionPreprocessConfig(min_pixels=3136, max_pixels=12845056).to_hf())
    )
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos, "pad_token_id": eos[1], "do_sample": False})
    )
    return out


def _rename_to_v5(out: Path) -> None:
    """Rewrite the tensors with transformers 5.x in-memory names."""

    def v5(name: str) -> str:
        if name.startswith("visual."):
            return "model." + name
        if name.startswith("model."):
            return "model.language_model." + name[len("model.") :]
        return name

    index = out / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        for shard in set(data["weight_map"].values()):
            tensors = load_file(out / shard)
            save_file(
                {v5(k): v for k, v in tensors.items()}, out / shard, metadata={"format": "pt"}
            )
        data["weight_map"] = {v5(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    else:
        tensors = load_file(out / "model.safetensors")
        save_file(
            {v5(k): v for k, v in tensors.items()},
            out / "model.safetensors",
            metadata={"format": "pt"},
        )


def load_hf(folder: Path, family: str):
    """The transformers model from a tiny checkpoint folder (fp32, eager-free sdpa, eval)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_model_class(family).from_pretrained(folder, dtype=torch.float32).eval()
