"""Qwen2.5-VL: Qwen2-VL with a windowed ViT; ``family.py`` registers it."""
