"""Finding a checkpoint (local folder or Hugging Face id) and building the model from it.

The model is constructed on the meta device, every parameter is allocated once in the target dtype,
and tensors are read from disk straight into it (``weights.py``), so weights are never held twice.
Checkpoint names are the released (transformers 4.x) ones; other layouts a family declares
(``ModelFamily.weights``: transformers 5 writes ``model.language_model.*``) are accepted too. A
compact weight format (``qwenvl.models.formats``) is built into the model before loading, and
its modules take the checkpoint's tensors through ``allocate`` / ``finish_loading``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qwenvl.errors import CheckpointError, ConfigError
from qwenvl.models import ModelConfig, family_of, read_config
from qwenvl.models.formats import get_format
from qwenvl.models.parallel import ShardPlan, dense_slice, parallelize
from qwenvl.weight_cache import weight_cache
from qwenvl.weights import load_into, weight_files

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt"]


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a Hugging Face model id through ``huggingface_hub``."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder")
    name = str(name_or_path)
    if not _HF_ID.match(name):
        raise CheckpointError(f"checkpoint folder not found: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{name!r} is not a local folder and huggingface_hub is not installed. Download the "
            f"checkpoint first (`huggingface-cli download {name} --local-dir DIR`) and pass DIR."
        ) from None
    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # network errors, missing repos, auth: all mean "get it another way"
        raise CheckpointError(
            f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "Download the checkpoint folder first and pass its path."
        ) from e


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES.get(config.torch_dtype or "float32", torch.float32)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(folder: Path) -> ModelConfig:
    return read_config(folder / "config.json")


def load_model(
    folder: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    weight_format: str | None = None,
    shard: ShardPlan | None = None,
) -> tuple[nn.Module, ModelConfig]:
    """Build the model for a checkpoint folder and load its weights (strict).

    ``weight_format`` ("bf16", "int8"; None = dense) stores the decoder's linear weights
    compactly (:mod:`qwenvl.models.formats`) while activations run in ``dtype``; they are read
    in the checkpoint's 16-bit dtype (or ``dtype`` when that is wider), never widened first.
    ``shard`` (tensor parallelism, :mod:`qwenvl.models.parallel`): build this rank's share of
    the model and read only its slice of each tensor; the collectives are attached by
    ``parallelize`` with the plan's process group. Returns the model and its (local) config.
    A compact format's built model is cached on disk and mapped by later loads
    (:mod:`qwenvl.weight_cache`).
    """
    folder = Path(folder)
    config = load_config(folder) if shard is None else shard.config
    if weight_format is None:  # an AWQ/GPTQ checkpoint can only load in its own format
        from qwenvl.models.quantized import format_for, quantization_config_of

        quant = quantization_config_of(read_json(folder / "config.json"))
        weight_format = None if quant is None else format_for(quant).name
    files = weight_files(folder)
    torch_dtype = resolve_dtype(dtype, config)
    cache = None if shard else weight_cache(folder, files, weight_format, torch_dtype, device)
    cached = cache.load() if cache is not None else None
    if cached is not None:
        return cached, config
    model = _build_and_load(folder, config, files, torch_dtype, device, progress, weight_format,
                            shard)  # fmt: skip
    if cache is not None:
        cache.store(model)
    return model, config


def _build_and_load(
    folder: Path,
    config: ModelConfig,
    files: list[Path],
    torch_dtype: torch.dtype,
    device: str | torch.device,
    progress: Callable[[int, int], None] | None,
    weight_format: str | None,
    shard: ShardPlan | None,
) -> nn.Module:
    """``load_model``'s work: the model built on the meta device, then filled from the files."""
    family = family_of(config)
    stored = resolve_dtype("auto", config)
    with torch.device("meta"):
        model = family.build(config, get_format(weight_format))
        if shard is not None:
            parallelize(model, shard, group=None)  # the default process group
    # Allocate every tensor once, in its final dtype and device; buffers were built on the CPU.
    params = {
        name: torch.empty(p.shape, dtype=torch_dtype, device=device)
        for name, p in model.named_parameters()  # tied parameters are listed once
    }
    # int8 quantises from the checkpoint's 16-bit weights, or from ``dtype`` when that is smaller
    staging = stored if stored.itemsize < torch_dtype.itemsize else torch_dtype
    compact, owners = _allocate_compact(model, device, staging)
    targets = {**params, **compact}
    pending: dict[nn.Module, list[str]] = {}
    for name, m in owners.items():
        pending.setdefault(m, []).append(name)

    def loaded(name: str) -> None:  # compact a module as soon as its last tensor is in, and
        m = owners.get(name)  # let its staging go: one layer's at a time, not the decoder's
        if m is None or any(n not in done for n in pending[m]):
            return
        m.finish_loading()
        for n in pending.pop(m):
            targets.pop(n, None), compact.pop(n, None)

    done: set[str] = set()
    tied = config.tie_word_embeddings
    compact_head = "lm_head.weight" in compact
    load_into(
        targets,
        files,
        family.weights.from_hf,
        ignored={"lm_head.weight"} if tied else set(),
        optional={"lm_head.weight"} if tied else set(),
        progress=progress,
        on_loaded=lambda name: (done.add(name), loaded(name)),
        slices=None if shard is None else _shard_slices(shard, targets, owners),
        ignored_prefixes=() if shard is None or shard.vision else ("visual.",),
    )
    if tied:
        if compact_head:  # the compact head gets its own copy of the embedding
            compact["lm_head.weight"].copy_(params["model.embed_tokens.weight"])
            done.add("lm_head.weight")
            loaded("lm_head.weight")
        else:
            params["lm_head.weight"] = params["model.embed_tokens.weight"]
    model.load_state_dict(params, strict=False, assign=True)
    if tied and not compact_head:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device)
    model.eval().requires_grad_(False)
    logger.info(
        "loaded %s (%s, weights %s) from %s", config.family, torch_dtype, weight_format, folder
    )
    return model


def _shard_slices(
    shard: ShardPlan, targets: dict[str, torch.Tensor], owners: dict[str, nn.Module]
) -> dict[str, tuple[int, int]]:
    """(dim, start) of every tensor this rank reads a slice of: plain weights by the dense rule,
    a compact module's by its own ``shard_slice`` (packed integers split where they are packed)."""
    out = {}
    for name in targets:
        split = shard.tensor_split(name)
        if split is not None:
            rule = getattr(owners.get(name), "shard_slice", dense_slice)
            where = rule(*split)
            if where is not None:
                out[name] = where
    return out


def _allocate_compact(
    model: nn.Module, device: str | torch.device, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """Allocate the compact-format modules: the tensors they read by checkpoint name, and the
    module each name belongs to (whose ``finish_loading`` runs once all of its are read)."""
    targets: dict[str, torch.Tensor] = {}
    owners: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if not hasattr(m, "allocate"):
            continue
        parent = name.rpartition(".")[0]
        for rel, t in m.allocate(device, dtype).items():
            if getattr(m, "parts", None):
                key = f"{parent}.{rel}" if parent else rel
            else:
                key = f"{name}.{rel}"
            targets[key] = t
            owners[key] = m
    return targets, owners


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint file, with errors that name the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data
