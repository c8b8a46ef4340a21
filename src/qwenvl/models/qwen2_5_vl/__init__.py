"""Qwen2.5-VL."""

from qwenvl.models.qwen2_5_vl.model import Qwen2_5_VLForConditionalGeneration

__all__ = ["Qwen2_5_VLForConditionalGeneration"]
