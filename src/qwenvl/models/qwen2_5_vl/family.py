"""Qwen2.5-VL declares itself: Qwen2-VL with its own vision config, windowed ViT, time-aligned
video positions and JSON grounding in resized-image pixels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qwenvl.models import register
from qwenvl.models.interface import Grid
from qwenvl.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration
from qwenvl.models.qwen2_vl.config import ModelConfig, VisionConfig
from qwenvl.models.qwen2_vl.family import Qwen2VL
from qwenvl.models.qwen2_vl.positions import get_mrope_positions


@register
class Qwen2_5_VL(Qwen2VL):
    model_type = "qwen2_5_vl"
    display_name = "Qwen2.5-VL"
    model_class = Qwen2_5_VLForConditionalGeneration
    grounding = "resized"

    def parse_config(self, data: dict[str, Any], source: str) -> ModelConfig:
        return ModelConfig.from_hf(data, source, VisionConfig.from_qwen2_5_vl)

    def positions(
        self,
        config: ModelConfig,
        token_ids: Sequence[int],
        image_grids: Sequence[Grid],
        video_grids: Sequence[Grid],
        video_seconds: Sequence[float],
    ) -> tuple[torch.Tensor, int]:
        """A video's T counts absolute time: ``seconds per grid step * tokens_per_second``."""
        return get_mrope_positions(
            token_ids,
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            image_grids=image_grids,
            video_grids=video_grids,
            second_per_grid_ts=video_seconds,
            tokens_per_second=config.vision.tokens_per_second,
            spatial_merge_size=config.vision.spatial_merge_size,
        )
