"""The model registry: a checkpoint's ``model_type`` names its :class:`ModelFamily`.

Built-in families are imported on first use; :func:`register` adds another without touching the
rest of qwenvl: in-process, or from an installed package that declares an entry point in the
``qwenvl.model_families`` group named after its ``model_type`` (loaded when a checkpoint of that
type is first seen, so ``qwenvl serve`` finds it too).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from qwenvl.errors import ConfigError
from qwenvl.models.interface import (
    DecoderLayout,
    KVShape,
    ModelFamily,
    VLModel,
    WeightNames,
)
from qwenvl.models.qwen2_vl.config import ModelConfig

PLUGIN_GROUP = "qwenvl.model_families"
# model_type -> the module whose import registers it
_BUILTIN = {
    "qwen2_vl": "qwenvl.models.qwen2_vl.family",
    "qwen2_5_vl": "qwenvl.models.qwen2_5_vl.family",
}
_FAMILIES: dict[str, ModelFamily] = {}


def register(family: type[ModelFamily]) -> type[ModelFamily]:
    """Register a family class under its ``model_type`` (usable as a class decorator)."""
    _FAMILIES[family.model_type] = family()
    return family


def _plugins() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP)}


def supported() -> list[str]:
    """Every ``model_type`` qwenvl can load (built in, registered or installed as a plugin)."""
    return sorted({*_BUILTIN, *_FAMILIES, *_plugins()})


def get_family(model_type: Any) -> ModelFamily:
    """The family registered for ``model_type``; a ConfigError naming the supported ones."""
    if model_type not in _FAMILIES and model_type in _BUILTIN:
        importlib.import_module(_BUILTIN[model_type])
    if model_type not in _FAMILIES and isinstance(model_type, str):
        plugin = _plugins().get(model_type)
        if plugin is not None:  # the entry point names a family class, or a module that registers
            loaded = plugin.load()
            if isinstance(loaded, type) and issubclass(loaded, ModelFamily):
                register(loaded)
    if model_type not in _FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not supported (expected {supported()})")
    return _FAMILIES[model_type]


def family_of(config: ModelConfig) -> ModelFamily:
    """The family of a parsed config."""
    return get_family(config.family)


def parse_config(data: Any, source: str = "config.json") -> ModelConfig:
    """A config.json dict -> its family's config."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    try:
        family = get_family(data.get("model_type"))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return family.parse_config(data, source)


def read_config(path: str | Path) -> ModelConfig:
    """Parse a checkpoint's config.json, with errors that name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: file not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    return parse_config(data, source=str(path))


__all__ = [
    "DecoderLayout",
    "KVShape",
    "ModelConfig",
    "ModelFamily",
    "VLModel",
    "WeightNames",
    "family_of",
    "get_family",
    "parse_config",
    "PLUGIN_GROUP",
    "read_config",
    "register",
    "supported",
]
