"""Qwen2-VL: config, vision tower, decoder, positions; ``family.py`` registers it."""
