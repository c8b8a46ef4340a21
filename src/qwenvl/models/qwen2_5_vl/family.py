"""Qwen2.5-VL declares itself: Qwen2-VL with its own vision config, windowed ViT, time-aligned
video positions and JSON grounding in resized-image pixels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qwenvl.models import register
from qwenvl.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration
from qwenvl.models.qwen2_vl.config import ModelConfig, VisionConfig
from qwenvl.models.qwen2_vl.family import Qwen2VL


@register
class Qwen2_5_VL(Qwen2VL):
    model_type = "qwen2_5_vl"
    display_name = "Qwen2.5-VL"
    model_class = Qwen2_5_VLForConditionalGeneration
    grounding = "resized"

    def parse_config(self, data: dict[str, Any], source: str) -> ModelConfig:
        return ModelConfig.from_hf(data, source, VisionConfig.from_qwen2_5_vl)

    def video_time(
        self, config: ModelConfig, video_seconds: Sequence[float]
    ) -> tuple[Sequence[float] | None, float | None]:
        """A video's T axis counts absolute time: seconds per grid step * tokens_per_second."""
        return video_seconds, config.vision.tokens_per_second
