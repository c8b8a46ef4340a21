"""Shared fixtures: tiny random-weight checkpoints of both families, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py, importable from every test folder

import tiny  # noqa: E402

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _weight_cache(tmp_path_factory: pytest.TempPathFactory):
    """Built weights cache in the session's temporary folder (subprocesses inherit it), not in
    the user's home."""
    import os

    before = os.environ.get("QWENVL_CACHE_DIR")
    os.environ["QWENVL_CACHE_DIR"] = str(tmp_path_factory.mktemp("qwenvl-cache"))
    yield
    if before is None:
        os.environ.pop("QWENVL_CACHE_DIR", None)
    else:
        os.environ["QWENVL_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """``checkpoints(family, **variant)`` -> folder; each variant is built once per session."""
    root = tmp_path_factory.mktemp("ckpt")
    built: dict[tuple, Path] = {}

    def get(family: str, **variant) -> Path:
        key = (family, *sorted(variant.items()))
        if key not in built:
            name = "_".join([family] + [f"{k}-{v}" for k, v in sorted(variant.items())])
            built[key] = tiny.build_checkpoint(root / name, family, **variant)
        return built[key]

    return get


@pytest.fixture(scope="session")
def llms(checkpoints):
    """``llms(family)`` -> a float32 ``LLM`` on the default tiny checkpoint, cached."""
    from qwenvl import LLM

    cache: dict[str, LLM] = {}

    def get(family: str) -> LLM:
        if family not in cache:
            cache[family] = LLM(checkpoints(family), dtype="float32")
        return cache[family]

    return get


@pytest.fixture(scope="session")
def hf_models(checkpoints):
    cache: dict[str, torch.nn.Module] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = tiny.load_hf(checkpoints(family), family)
        return cache[family]

    return get
