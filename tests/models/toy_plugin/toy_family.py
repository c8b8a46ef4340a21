"""A toy third model family, test-only: it proves a family plugs in through the registry alone.

``toy_vl`` checkpoints are tiny Qwen2-VL checkpoints with their own ``model_type``, their own config
class (``ToyConfig``, with a field of its own) and their own position rule: one position stream,
every token one step after the last, and ``item_gap`` extra steps after each image or video.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from qwenvl.models import ModelConfig, ModelFamily, register
from qwenvl.models.qwen2_vl.config import VisionConfig
from qwenvl.models.qwen2_vl.family import TRANSFORMERS5_NAMES
from qwenvl.models.qwen2_vl.model import Qwen2VLForConditionalGeneration

MODEL_TYPE = "toy_vl"


@dataclass(frozen=True)
class ToyConfig(ModelConfig):
    item_gap: int = 0  # position steps skipped after each vision item


def toy_positions(
    token_ids: Sequence[int], vision_ids: set[int], item_gap: int
) -> tuple[torch.Tensor, int]:
    """``[3, L]`` equal streams and the decode delta, token by token (the independent truth)."""
    out, gap, prev_vision = [], 0, False
    for tid in token_ids:
        is_vision = tid in vision_ids
        if prev_vision and not is_vision:
            gap += item_gap
        out.append(len(out) + gap)
        prev_vision = is_vision
    if prev_vision:
        gap += item_gap
    pos = torch.tensor(out, dtype=torch.long).expand(3, -1).clone()
    return pos, gap


class ToyVL(ModelFamily):
    model_type = MODEL_TYPE
    display_name = "Toy-VL"
    model_class = Qwen2VLForConditionalGeneration
    grounding = "resized"
    weights = TRANSFORMERS5_NAMES

    def parse_config(self, data: dict[str, Any], source: str) -> ToyConfig:
        base = ModelConfig.from_hf(data, source, VisionConfig.from_qwen2_vl)
        shared = {f.name: getattr(base, f.name) for f in fields(ModelConfig)}
        return ToyConfig(**shared, item_gap=int(data.get("item_gap", 0)))

    def positions(self, config, token_ids, image_grids, video_grids, video_seconds):
        vision = {config.image_token_id, config.video_token_id}
        return toy_positions(token_ids, vision, config.item_gap)


def register_toy() -> None:
    register(ToyVL)
