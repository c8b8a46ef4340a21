"""Fine-tuning: SFT and DPO, full or LoRA (peft), packing, exact resume, Hugging Face export.

``train(TrainConfig(model=..., data=..., output=...))`` or ``qwenvl train``; see the README.
"""

from __future__ import annotations

from qwenvl.train.lora import LoraOptions
from qwenvl.train.trainer import TrainConfig, Trainer, TrainResult, train

__all__ = ["LoraOptions", "TrainConfig", "TrainResult", "Trainer", "train"]
