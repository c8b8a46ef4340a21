"""Finding a checkpoint (local folder or Hugging Face id) and building the model from it.

The model is constructed on the meta device, every parameter is allocated once in the target dtype,
and tensors are read from disk straight into it (``weights.py``), so weights are never held twice.
Checkpoint names are the released (transformers 4.x) ones; the 5.x in-memory names
(``model.language_model.*``, ``model.visual.*``) are accepted too.
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
from qwenvl.models import ModelConfig, model_class
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


def hf_to_native(name: str) -> str:
    """Map a checkpoint tensor name (4.x released or 5.x in-memory) to ours (= the released one)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return name[len("model.") :]
    return name


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES.get(config.torch_dtype or "float32", torch.float32)
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(folder: Path) -> ModelConfig:
    return ModelConfig.from_file(folder / "config.json")


def load_model(
    folder: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    packed: str | None = None,
) -> tuple[nn.Module, ModelConfig]:
    """Build the model for a checkpoint folder and load its weights (strict).

    ``packed`` ("bf16" or "int8") stores the decoder's linear weights compactly
    (:mod:`qwenvl.layers.packed_linear`) while activations run in ``dtype``; they are read in
    the checkpoint's 16-bit dtype (or ``dtype`` when that is wider), never widened first.
    """
    from qwenvl.layers.packed_linear import decoder_linears, pack_linears

    folder = Path(folder)
    config = load_config(folder)
    files = weight_files(folder)
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = model_class(config)(config)
    stored = resolve_dtype("auto", config)
    compact = {n + ".weight" for n in decoder_linears(model)} if packed else set()
    # Allocate every parameter once, in its final dtype and device; buffers were built on the CPU.
    params: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # tied parameters are listed once
        dt = stored if name in compact and stored.itemsize < torch_dtype.itemsize else torch_dtype
        params[name] = torch.empty(p.shape, dtype=dt, device=device)
    tied = config.tie_word_embeddings
    load_into(
        params,
        files,
        hf_to_native,
        ignored={"lm_head.weight"} if tied else set(),
        progress=progress,
    )
    state = dict(params)
    if tied:
        state["lm_head.weight"] = params["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device)
    model.eval().requires_grad_(False)
    if packed:
        pack_linears(model, packed)
    logger.info("loaded %s (%s, packed %s) from %s", config.family, torch_dtype, packed, folder)
    return model, config


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
