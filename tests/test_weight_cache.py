"""The built-weights cache: a second load of a packed or quantised model maps the first one's file
and gives the same logits as a fresh build; a changed checkpoint, a damaged file or the switch
turn it off for that load."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from qwenvl.checkpoint import load_model

FORMATS = ["bf16", "int8", "int4"]


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QWENVL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights"


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[3, 17, 5, 9, 42, 7]])
    positions = torch.arange(ids.shape[1]).expand(3, 1, -1)
    with torch.no_grad():
        return model.compute_logits(model.decode(model.embed_tokens(ids), positions)[0])


def fresh(folder: Path, fmt: str, monkeypatch) -> torch.Tensor:
    """The truth: the same load with the cache off (the packing code the parity tests cover)."""
    with monkeypatch.context() as m:
        m.setenv("QWENVL_WEIGHT_CACHE", "0")
        return logits(load_model(folder, dtype="float32", weight_format=fmt)[0])


def mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("fmt", FORMATS)
def test_second_load_maps_the_cache(checkpoints, cache_dir, monkeypatch, fmt):
    folder = checkpoints("qwen2_vl")
    truth = fresh(folder, fmt, monkeypatch)
    assert not cache_dir.exists()
    first = load_model(folder, dtype="float32", weight_format=fmt)[0]
    (entry,) = cache_dir.iterdir()
    assert entry.name.startswith(f"{folder.name}-{fmt}-")
    second = load_model(folder, dtype="float32", weight_format=fmt)[0]
    assert list(cache_dir.iterdir()) == [entry]  # read, not rebuilt
    if Path("/proc/self/maps").exists():
        assert mapped(entry / "model.pt")
    assert torch.equal(logits(first), truth)
    assert torch.equal(logits(second), truth)
    assert not any(p.requires_grad for p in second.parameters()) and not second.training


def test_a_changed_checkpoint_gets_a_new_entry(checkpoints, cache_dir, monkeypatch, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints("qwen2_vl"), folder)
    load_model(folder, dtype="float32", weight_format="bf16")
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(1, 1))  # even with an older time stamp
    model = load_model(folder, dtype="float32", weight_format="bf16")[0]
    assert len(list(cache_dir.iterdir())) == 2
    assert torch.equal(logits(model), fresh(folder, "bf16", monkeypatch))


def test_dense_loads_and_the_switch_write_nothing(checkpoints, cache_dir, monkeypatch):
    folder = checkpoints("qwen2_vl")
    load_model(folder, dtype="float32")
    monkeypatch.setenv("QWENVL_WEIGHT_CACHE", "0")
    load_model(folder, dtype="float32", weight_format="int8")
    assert not cache_dir.exists()


def test_a_damaged_file_is_rebuilt(checkpoints, cache_dir, monkeypatch, caplog):
    folder = checkpoints("qwen2_5_vl")
    load_model(folder, dtype="float32", weight_format="int8")
    (entry,) = cache_dir.iterdir()
    data = (entry / "model.pt").read_bytes()
    (entry / "model.pt").write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING", logger="qwenvl.weight_cache"):
        model = load_model(folder, dtype="float32", weight_format="int8")[0]
    assert "unreadable" in caplog.text
    assert torch.equal(logits(model), fresh(folder, "int8", monkeypatch))
    assert (entry / "model.pt").stat().st_size == len(data)  # written again, whole
