"""Random-weight checkpoints of the exact released shapes of Qwen2-VL-2B-Instruct and
Qwen2.5-VL-3B-Instruct (``full``), of Qwen2-VL-7B-Instruct (``7b``: its own vocabulary size and an
untied LM head), or of the same structure with small widths (``small``), in the released layout:
flat hub config.json, bf16 safetensors with the released tensor names (shards of at most 4 GB
written one at a time), the special tokens at their released ids. Used by the benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zlib
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
RELEASED = {"qwen2_vl": "Qwen2-VL-2B-Instruct", "qwen2_5_vl": "Qwen2.5-VL-3B-Instruct"}
# Released special token ids (identical in both families): 151643.. in this order.
FIRST_ADDED_ID = 151643
VOCAB_SIZE = 151936
PAD_ID, IM_END_ID = 151643, 151645

# LLM and vision shapes. "full" = the released checkpoints; "small" = same structure, tiny widths;
# "7b" = Qwen2-VL-7B-Instruct. Optional keys (defaults for the entries without them): vocab
# (VOCAB_SIZE), tied (True: no lm_head tensor), released (RELEASED[family], the folder name).
SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "qwen2_vl": dict(
            hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, max_pos=32768,
            mrope=[16, 24, 24], max_window_layers=28,
            vision=dict(depth=32, width=1280, heads=16, mlp_ratio=4),
        ),
        "qwen2_5_vl": dict(
            hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008, max_pos=128000,
            mrope=[16, 24, 24], max_window_layers=70,
            vision=dict(depth=32, width=1280, heads=16, intermediate=3420, fullatt=[7, 15, 23, 31]),
        ),
    },
    "small": {
        "qwen2_vl": dict(
            hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, max_pos=32768,
            mrope=[8, 12, 12], max_window_layers=4,
            vision=dict(depth=4, width=128, heads=2, mlp_ratio=4),
        ),
        "qwen2_5_vl": dict(
            hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, max_pos=128000,
            mrope=[8, 12, 12], max_window_layers=4,
            vision=dict(depth=4, width=128, heads=2, intermediate=256, fullatt=[1, 3]),
        ),
    },
    "7b": {
        "qwen2_vl": dict(
            hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, max_pos=32768,
            mrope=[16, 24, 24], max_window_layers=28, vocab=152064, tied=False,
            released="Qwen2-VL-7B-Instruct",
            vision=dict(depth=32, width=1280, heads=16, mlp_ratio=4),
        ),
    },
}  # fmt: skip


CORPUS = [
    "You are a helpful assistant.",
    "Describe this image in detail. What is in the picture? Count the boxes and the circles.",
    "The red box is on the left, the blue circle is on the right and a green line crosses them.",
    "Write a short story about a robot who learns to paint landscapes at night.",
    "Explain how a transformer language model generates text one token at a time.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "system user assistant Picture Video image video frame second minute hour",
] * 8


def log(msg: str) -> None:
    print(msg, flush=True)


# --- checkpoints --------------------------------------------------------------------------------
def spec_of(family: str, shape: str | dict[str, Any]) -> dict[str, Any]:
    """The SHAPES entry for (family, shape); a dict ``shape`` is itself such an entry."""
    return SHAPES[shape][family] if isinstance(shape, str) else shape


def hub_config(family: str, shape: str | dict[str, Any]) -> dict[str, Any]:
    """config.json in the released flat (transformers 4.x) layout."""
    s = spec_of(family, shape)
    v = s["vision"]
    if family == "qwen2_vl":
        vision = {
            "depth": v["depth"],
            "embed_dim": v["width"],
            "mlp_ratio": v["mlp_ratio"],
            "num_heads": v["heads"],
            "in_chans": 3,
            "hidden_size": s["hidden"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        }
        arch = "Qwen2VLForConditionalGeneration"
    else:
        vision = {
            "depth": v["depth"],
            "hidden_act": "silu",
            "hidden_size": v["width"],
            "intermediate_size": v["intermediate"],
            "num_heads": v["heads"],
            "in_chans": 3,
            "out_hidden_size": s["hidden"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": v["fullatt"],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        }
        arch = "Qwen2_5_VLForConditionalGeneration"
    return {
        "architectures": [arch],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate"],
        "max_position_embeddings": s["max_pos"],
        "max_window_layers": s["max_window_layers"],
        "model_type": family,
        "num_attention_heads": s["heads"],
        "num_hidden_layers": s["layers"],
        "num_key_value_heads": s["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": s.get("tied", True),
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": vision,
        "rope_scaling": {"type": "mrope", "mrope_section": s["mrope"]},
        "vocab_size": s.get("vocab", VOCAB_SIZE),
    }


def tensor_shapes(family: str, shape: str | dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint with the released (4.x) names; no ``lm_head.weight`` when
    the embedding is tied."""
    s = spec_of(family, shape)
    v = s["vision"]
    h, inter = s["hidden"], s["intermediate"]
    kv = s["kv_heads"] * (h // s["heads"])
    vocab = s.get("vocab", VOCAB_SIZE)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        for name, rows in (("q", h), ("k", kv), ("v", kv)):
            out[p + f"self_attn.{name}_proj.weight"] = (rows, h)
            out[p + f"self_attn.{name}_proj.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, h)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (inter, h)
        out[p + "mlp.up_proj.weight"] = (inter, h)
        out[p + "mlp.down_proj.weight"] = (h, inter)
    out["model.norm.weight"] = (h,)
    if not s.get("tied", True):
        out["lm_head.weight"] = (vocab, h)
    e = v["width"]
    qwen2 = family == "qwen2_vl"
    out["visual.patch_embed.proj.weight"] = (e, 3, 2, 14, 14)
    for j in range(v["depth"]):
        p = f"visual.blocks.{j}."
        for norm in ("norm1", "norm2"):
            out[p + norm + ".weight"] = (e,)
            if qwen2:
                out[p + norm + ".bias"] = (e,)
        out[p + "attn.qkv.weight"] = (3 * e, e)
        out[p + "attn.qkv.bias"] = (3 * e,)
        out[p + "attn.proj.weight"] = (e, e)
        out[p + "attn.proj.bias"] = (e,)
        if qwen2:
            m = e * v["mlp_ratio"]
            mlp = {"fc1": (m, e), "fc2": (e, m)}
        else:
            m = v["intermediate"]
            mlp = {"gate_proj": (m, e), "up_proj": (m, e), "down_proj": (e, m)}
        for name, shp in mlp.items():
            out[p + f"mlp.{name}.weight"] = shp
            out[p + f"mlp.{name}.bias"] = (shp[0],)
    out["visual.merger.ln_q.weight"] = (e,)
    if qwen2:
        out["visual.merger.ln_q.bias"] = (e,)
    out["visual.merger.mlp.0.weight"] = (4 * e, 4 * e)
    out["visual.merger.mlp.0.bias"] = (4 * e,)
    out["visual.merger.mlp.2.weight"] = (h, 4 * e)
    out["visual.merger.mlp.2.bias"] = (h,)
    return out


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16 weights, normal(0, 0.02); norm scales are ones. Seeded per tensor name."""
    if len(shape) == 1 and name.endswith(".weight"):  # RMSNorm / LayerNorm scales
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)


def build_tokenizer():
    """A small trained byte-level BPE, its vocabulary filled with byte strings up to id 151642 so
    the 22 added tokens get their released ids (151643..151664)."""
    import tokenizers
    from tokenizers import pre_tokenizers

    from qwenvl.tokenizer import train_qwen_style_tokenizer

    tok = train_qwen_style_tokenizer(CORPUS, vocab_size=1000)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    fill = (a + b for a in alphabet for b in alphabet)
    fill3 = (a + b + c for a in alphabet for b in alphabet for c in alphabet)
    for word in (w for g in (fill, fill3) for w in g):
        if len(vocab) >= FIRST_ADDED_ID:
            break
        if word not in vocab:
            vocab[word] = len(vocab)
    data["model"]["vocab"] = vocab
    for k, added in enumerate(data["added_tokens"]):
        added["id"] = FIRST_ADDED_ID + k
    tok = tokenizers.Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    for content, want in (("<|endoftext|>", 151643), ("<|im_end|>", 151645),
                          ("<|vision_start|>", 151652), ("<|vision_end|>", 151653),
                          ("<|image_pad|>", 151655), ("<|video_pad|>", 151656),
                          ("<|file_sep|>", 151664)):  # fmt: skip
        got = tok.token_to_id(content)
        if got != want:
            raise RuntimeError(f"tokenizer: {content} has id {got}, expected {want}")
    return tok


def write_side_files(out: Path, family: str, config: dict[str, Any]) -> None:
    """Everything of a released checkpoint folder but the weights: config.json, the tokenizer
    files with the chat template, generation_config.json and preprocessor_config.json."""
    from qwenvl.processing.image import VisionPreprocessConfig
    from qwenvl.tokenizer import save_tokenizer_files

    out.mkdir(parents=True, exist_ok=True)
    template = files("qwenvl").joinpath("data/qwen2_vl_chat_template.jinja").read_text()
    save_tokenizer_files(
        build_tokenizer(),
        out,
        chat_template=template,
        model_max_length=32768 if family == "qwen2_vl" else 131072,
    )
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "top_k": 1,
        "top_p": 0.001,
        "temperature": 0.01 if family == "qwen2_vl" else 0.1,
        "transformers_version": "4.41.2",
    }
    if family == "qwen2_5_vl":
        generation["repetition_penalty"] = 1.05
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    preprocessor = VisionPreprocessConfig(min_pixels=3136, max_pixels=12845056).to_hf()
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))


def build_checkpoint(cache: Path, family: str, shape: str, seed: int = 0) -> Path:
    """The checkpoint folder for (family, shape), built once; later calls reuse it."""
    config = hub_config(family, shape)
    shapes = tensor_shapes(family, shape)
    spec = json.dumps([config, sorted(shapes.items()), seed, 2], sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:10]
    released = spec_of(family, shape).get("released", RELEASED[family])
    out = cache / f"{released}-{shape}-random-{key}"
    if (out / ".complete").exists():
        return out
    from safetensors.torch import save_file

    log(f"building {out} ...")
    t0 = time.perf_counter()
    write_side_files(out, family, config)

    # Shards of at most 4 GB, written one at a time (only one shard's bf16 tensors in memory).
    limit = 4 * 10**9
    shards: list[list[str]] = [[]]
    size = 0
    for name, shp in shapes.items():
        nbytes = 2 * math.prod(shp)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    total = sum(2 * math.prod(s) for s in shapes.values())
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    for file, members in zip(names, shards):
        tensors = {n: random_tensor(n, shapes[n], seed) for n in members}
        save_file(tensors, out / file, metadata={"format": "pt"})
        del tensors
        log(f"  wrote {file} ({time.perf_counter() - t0:.0f} s)")
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: f for f, ms in zip(names, shards) for n in ms},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / ".complete").write_text("")
    params = total // 2
    log(f"built {out.name}: {params / 1e9:.3f} B params, {total / 1e9:.2f} GB bf16 "
        f"in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    return out
