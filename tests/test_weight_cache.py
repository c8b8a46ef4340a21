"""The built-weights cache: a second load of a packed or quantised model maps the first one's file
and gives the same logits as a fresh build; a changed checkpoint, a damaged file or the switch
turn it off for that load."""

from __future__ import annotations

import json
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
    (old,) = cache_dir.iterdir()
    model = load_model(folder, dtype="float32", weight_format="bf16")[0]
    (new,) = cache_dir.iterdir()  # the old entry, which no load can match again, is deleted
    assert new != old and (new / "model.pt").is_file()
    assert torch.equal(logits(model), fresh(folder, "bf16", monkeypatch))


def test_other_formats_and_checkpoints_keep_their_entries(checkpoints, cache_dir, tmp_path):
    """Only a folder of the same origin is stale: another format of the checkpoint, a checkpoint
    of the same folder name elsewhere, and a folder without origin.json are all left."""
    folder = checkpoints("qwen2_vl")
    twin = tmp_path / "elsewhere" / folder.name
    shutil.copytree(folder, twin)
    foreign = cache_dir / f"{folder.name}-bf16-0000"  # an older qwenvl's folder: no origin.json
    foreign.mkdir(parents=True)
    (foreign / "model.pt").write_bytes(b"x")
    for path, fmt in ((folder, "bf16"), (folder, "int8"), (twin, "bf16")):
        load_model(path, dtype="float32", weight_format=fmt)
    entries = set(cache_dir.iterdir())
    assert len(entries) == 4 and foreign in entries
    origins = [json.loads((e / "origin.json").read_text()) for e in entries - {foreign}]
    assert sorted((o["checkpoint"], o["format"]) for o in origins) == sorted(
        [
            (str(folder.resolve()), "bf16"),
            (str(folder.resolve()), "int8"),
            (str(twin.resolve()), "bf16"),
        ]
    )


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
