"""Qwen2.5-VL: Qwen2-VL with the windowed ViT; the decoder and the glue are shared.

The time-aligned video positions are a property of the config (``tokens_per_second``) and are
handled by the shared position code.
"""

from __future__ import annotations

from qwenvl.models.qwen2_5_vl.vision import Qwen25VisionTransformer
from qwenvl.models.qwen2_vl.model import Qwen2VLForConditionalGeneration


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_class = Qwen25VisionTransformer
