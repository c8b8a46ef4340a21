"""``qwenvl info``: describe a checkpoint (architecture, parameters, sizes, image limits,
sampling defaults) without loading its weights, and the CPU kernel path this machine runs.

Registered in :data:`qwenvl.cli.main.SUBCOMMANDS` (``add_info`` / ``cmd_info``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwenvl import kernels
from qwenvl.checkpoint import load_config, read_json, resolve_checkpoint
from qwenvl.cli.common import add_model_args, add_vision_args
from qwenvl.models import ModelConfig, family_of
from qwenvl.processing.prompt import Processor
from qwenvl.sampling import SamplingParams
from qwenvl.weights import SAFE_DTYPES, read_header, weight_files

if TYPE_CHECKING:
    from qwenvl.cli.common import Subparsers


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameter counts of the model a config describes (built on the meta device: no weights).

    Tied embeddings count once: ``named_parameters`` lists a shared tensor a single time.
    """
    with torch.device("meta"):
        module = family_of(config).build(config)
    total = vision = 0
    for name, p in module.named_parameters():
        total += p.numel()
        if name.startswith("visual."):
            vision += p.numel()
    return {"total": total, "vision": vision, "language": total - vision}


QUANT_TENSORS = (".qweight", ".qzeros", ".scales", ".g_idx")


def weight_format(config_json: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    """The checkpoint's weight format and, for AWQ/GPTQ, the bytes per weight its quantised
    linears take on disk (packed integers, scales, zeros and act-order indices, from the
    safetensors headers: what a decode step streams for them once loaded)."""
    from qwenvl.models.quantized import format_for, quantization_config_of

    quant = quantization_config_of(config_json)
    if quant is None:
        return {"name": "dense", "bytes_per_weight": None}
    fmt = format_for(quant)
    weights = nbytes = 0
    for f in files:
        for name, spec in read_header(f)[0].items():
            if not name.endswith(QUANT_TENSORS):
                continue
            nbytes += spec["data_offsets"][1] - spec["data_offsets"][0]
            if name.endswith(".qweight"):  # int32 words of 32 / bits values each
                weights += math.prod(spec["shape"]) * (32 // fmt.bits)
    return {
        "name": fmt.name,
        "bits": fmt.bits,
        "group_size": fmt.group_size,
        "quantized_weights": weights,
        "bytes_per_weight": round(nbytes / weights, 4) if weights else None,
    }


def describe_checkpoint(
    model: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> dict[str, Any]:
    """Everything ``qwenvl info`` shows, as a JSON-ready dict; reads no weights."""
    path = resolve_checkpoint(model)
    config = load_config(path)
    files = weight_files(path)
    stored = {spec["dtype"] for f in files for spec in read_header(f)[0].values()}
    vision_pre = Processor.from_pretrained(
        path, config, min_pixels=min_pixels, max_pixels=max_pixels
    ).vision
    token_area = vision_pre.factor**2  # pixels per merged image token (28 * 28)
    gen_path = path / "generation_config.json"
    defaults = SamplingParams.from_generation_config(
        read_json(gen_path) if gen_path.exists() else {}
    )
    t, v = config.text, config.vision
    vision: dict[str, Any] = {
        "depth": v.depth,
        "embed_dim": v.embed_dim,
        "num_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "out_hidden_size": v.out_hidden_size,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "spatial_merge_size": v.spatial_merge_size,
    }
    if v.window_size is not None:  # windowed attention (Qwen2.5-VL)
        vision.update(
            window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            tokens_per_second=v.tokens_per_second,
        )
    return {
        "path": str(path.resolve()),
        "model_type": config.family,
        "family": family_of(config).display_name,
        "text": {
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings,
            "rope_theta": t.rope_theta,
            "mrope_section": list(t.mrope_section),
            "tie_word_embeddings": config.tie_word_embeddings,
        },
        "vision": vision,
        "parameters": count_parameters(config),
        "dtype": config.torch_dtype,
        "stored_dtypes": sorted(
            str(SAFE_DTYPES[d]).removeprefix("torch.") if d in SAFE_DTYPES else d for d in stored
        ),
        "weight_files": len(files),
        "weights_bytes": sum(f.stat().st_size for f in files),
        "weight_format": weight_format(read_json(path / "config.json"), files),
        "disk_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "image_limits": {
            "min_pixels": vision_pre.min_pixels,
            "max_pixels": vision_pre.max_pixels,
            "min_tokens": vision_pre.min_pixels // token_area,
            "max_tokens": vision_pre.max_pixels // token_area,
        },
        "sampling_defaults": {k: getattr(defaults, k) for k in sorted(defaults.explicit_fields)},
        "kernels": kernels.describe(),  # which CPU decode path this machine runs
    }


def _human(n: float, units: tuple[str, ...] = ("", "K", "M", "B", "T")) -> str:
    for unit in units[:-1]:
        if abs(n) < 1000:
            return f"{n:.2f}{unit}" if unit else f"{n:g}"
        n /= 1000
    return f"{n:.2f}{units[-1]}"


def _format_line(fmt: dict[str, Any]) -> str:
    if fmt["bytes_per_weight"] is None:
        return fmt["name"]
    return (
        f"{fmt['name']} ({fmt['bits']}-bit, group {fmt['group_size']}: "
        f"{fmt['bytes_per_weight']:.3f} bytes/weight over {_human(fmt['quantized_weights'])} "
        "quantised weights; the rest 16-bit)"
    )


def format_info(info: dict[str, Any]) -> str:
    """``describe_checkpoint``'s dict as an aligned two-column table."""
    n = info["parameters"]
    limits = info["image_limits"]
    size = _human(info["weights_bytes"], ("B", "KB", "MB", "GB", "TB"))
    sections: list[tuple[str, list[tuple[str, Any]]]] = [
        (
            "model",
            [
                ("family", f"{info['family']} ({info['model_type']})"),
                ("path", info["path"]),
                ("parameters", f"{n['total']:,} ({_human(n['total'])})"),
                ("  vision", f"{n['vision']:,} ({_human(n['vision'])})"),
                ("  language", f"{n['language']:,} ({_human(n['language'])})"),
                ("dtype", f"{info['dtype']} (stored: {', '.join(info['stored_dtypes'])})"),
                ("size on disk", f"{size} in {info['weight_files']} weight file(s)"),
                ("weight format", _format_line(info["weight_format"])),
                ("CPU kernels", info["kernels"]),
            ],
        ),
        ("text", list(info["text"].items())),
        ("vision", list(info["vision"].items())),
        (
            "image limits",
            [
                ("min_pixels", f"{limits['min_pixels']:,} ({limits['min_tokens']:,} tokens)"),
                ("max_pixels", f"{limits['max_pixels']:,} ({limits['max_tokens']:,} tokens)"),
            ],
        ),
        (
            "sampling defaults (generation_config.json)",
            list(info["sampling_defaults"].items()) or [("(none)", "")],
        ),
    ]
    width = max(len(key) for _, rows in sections for key, _ in rows) + 4
    lines: list[str] = []
    for title, rows in sections:
        lines.append(title)
        lines.extend(f"  {key:<{width}}{value}".rstrip() for key, value in rows)
    return "\n".join(lines)


def add_info(sub: Subparsers) -> None:
    p = sub.add_parser(
        "info",
        help="describe a checkpoint (sizes, parameters, limits, defaults)",
        description="Describe a checkpoint without loading its weights.",
    )
    add_model_args(p)
    add_vision_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    info = describe_checkpoint(args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
