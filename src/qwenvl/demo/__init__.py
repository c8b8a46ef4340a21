"""The demo model: synthetic block scenes, their tasks, the training recipe and evaluation."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEMO_MODEL_NAME = "qwenvl-demo"  # what the server calls it when no --model is given


def default_model_path() -> Path:
    """The shipped demo checkpoint (``qwenvl/data/demo-model``)."""
    return Path(str(files("qwenvl").joinpath("data/demo-model")))


EXAMPLE_SEED = 20240829  # Qwen2-VL's release day; the README's example scene
EXAMPLE_BLOCKS = 6


def example_image_path() -> Path:
    """The bundled example picture (``qwenvl/data/examples/blocks.png``)."""
    return Path(str(files("qwenvl").joinpath("data/examples/blocks.png")))


def example_scene():  # -> qwenvl.demo.scenes.Scene (imported lazily: PIL only when used)
    """The scene drawn in the example picture: its answers are known exactly."""
    import random

    from qwenvl.demo.scenes import random_scene

    return random_scene(random.Random(EXAMPLE_SEED), EXAMPLE_BLOCKS)
