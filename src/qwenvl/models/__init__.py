"""Model registry: a checkpoint's ``model_type`` picks the model class."""

from __future__ import annotations

import importlib

from torch import nn

from qwenvl.models.qwen2_vl.config import ModelConfig

_REGISTRY = {
    "qwen2_vl": ("qwenvl.models.qwen2_vl.model", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("qwenvl.models.qwen2_5_vl.model", "Qwen2_5_VLForConditionalGeneration"),
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    module, name = _REGISTRY[config.family]
    return getattr(importlib.import_module(module), name)


__all__ = ["ModelConfig", "model_class"]
