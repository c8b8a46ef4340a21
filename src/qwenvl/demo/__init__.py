"""The demo model: synthetic block scenes, their tasks, the training recipe and evaluation."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def default_model_path() -> Path:
    """The shipped demo checkpoint (``qwenvl/data/demo-model``)."""
    return Path(str(files("qwenvl").joinpath("data/demo-model")))
