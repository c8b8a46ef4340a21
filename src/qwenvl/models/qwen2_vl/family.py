"""Qwen2-VL declares itself: config parsing, model class, positions, names, grounding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qwenvl.models import register
from qwenvl.models.interface import Grid, ModelFamily, WeightNames
from qwenvl.models.qwen2_vl.config import ModelConfig, VisionConfig
from qwenvl.models.qwen2_vl.model import Qwen2VLForConditionalGeneration
from qwenvl.models.qwen2_vl.positions import get_mrope_positions

# transformers 5 names its modules model.language_model.* and model.visual.*
TRANSFORMERS5_NAMES = WeightNames(
    aliases=(("model.language_model.", "model."), ("model.visual.", "visual."))
)


@register
class Qwen2VL(ModelFamily):
    model_type = "qwen2_vl"
    display_name = "Qwen2-VL"
    model_class = Qwen2VLForConditionalGeneration
    grounding = "norm1000"
    weights = TRANSFORMERS5_NAMES

    def parse_config(self, data: dict[str, Any], source: str) -> ModelConfig:
        return ModelConfig.from_hf(data, source, VisionConfig.from_qwen2_vl)

    def positions(
        self,
        config: ModelConfig,
        token_ids: Sequence[int],
        image_grids: Sequence[Grid],
        video_grids: Sequence[Grid],
        video_seconds: Sequence[float],
    ) -> tuple[torch.Tensor, int]:
        seconds, per_second = self.video_time(config, video_seconds)
        return get_mrope_positions(
            token_ids,
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            image_grids=image_grids,
            video_grids=video_grids,
            second_per_grid_ts=seconds,
            tokens_per_second=per_second,
            spatial_merge_size=config.vision.spatial_merge_size,
        )

    def video_time(
        self, config: ModelConfig, video_seconds: Sequence[float]
    ) -> tuple[Sequence[float] | None, float | None]:
        """How a video's T axis counts: here every temporal grid step advances it by one."""
        return None, None
