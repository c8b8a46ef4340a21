"""Qwen2-VL."""

from qwenvl.models.qwen2_vl.model import Qwen2VLForConditionalGeneration

__all__ = ["Qwen2VLForConditionalGeneration"]
