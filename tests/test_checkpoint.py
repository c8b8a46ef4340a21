"""Checkpoint loading: every layout gives the same model, bad folders give our errors, RSS stays
low.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenvl.checkpoint import load_model, resolve_checkpoint
from qwenvl.errors import CheckpointError, ConfigError
from qwenvl.models import get_family, parse_config, read_config

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
VARIANTS = [
    dict(layout="flat", names="released"),
    dict(layout="nested", names="released"),
    dict(layout="flat", names="v5"),
    dict(layout="nested", names="v5", sharded=True),
    dict(layout="flat", names="released", sharded=True),
]


def logits_of(folder: Path) -> torch.Tensor:
    model, _ = load_model(folder, dtype="float32")
    ids = torch.arange(3, 40).view(1, -1)
    pos = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
    pixels = torch.randn(16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.cat(
            [model(ids, pos).flatten(), model.encode_vision(pixels, [(1, 4, 4)]).flatten()]
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_all_layouts_give_identical_logits(family, checkpoints):
    ref = logits_of(checkpoints(family))
    for variant in VARIANTS:
        assert torch.equal(logits_of(checkpoints(family, **variant)), ref), variant


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_embeddings(family, checkpoints):
    folder = checkpoints(family, tie=True)
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    model, cfg = load_model(folder, dtype="float32")
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_config_layouts_parse_the_same(checkpoints):
    for family in FAMILIES:
        flat = read_config(checkpoints(family) / "config.json")
        nested = read_config(checkpoints(family, layout="nested") / "config.json")
        assert flat.text == nested.text and flat.vision == nested.vision
        assert flat.image_token_id == nested.image_token_id
    v25 = read_config(checkpoints("qwen2_5_vl") / "config.json").vision
    assert (v25.embed_dim, v25.out_hidden_size, v25.fullatt_block_indexes) == (32, 64, (1, 3))
    v2 = read_config(checkpoints("qwen2_vl") / "config.json").vision
    assert (v2.embed_dim, v2.out_hidden_size, v2.intermediate_size) == (32, 64, 64)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype(dtype, checkpoints):
    model, _ = load_model(checkpoints("qwen2_vl"), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_and_unexpected_tensors(checkpoints, tmp_path):
    folder = copy_ckpt(checkpoints("qwen2_vl"), tmp_path / "c")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "unexpected tensors: model.layers.9.extra.weight" in str(e.value)


def test_wrong_shape(checkpoints, tmp_path):
    folder = copy_ckpt(checkpoints("qwen2_vl"), tmp_path / "c")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = torch.zeros(3)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"shape \(3,\) does not match the expected \(64,\)"):
        load_model(folder)


def test_truncated_file(checkpoints, tmp_path):
    folder = copy_ckpt(checkpoints("qwen2_vl"), tmp_path / "c")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(folder)


def test_missing_shard(checkpoints, tmp_path):
    folder = copy_ckpt(checkpoints("qwen2_vl", sharded=True), tmp_path / "c")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(folder)


def test_pickled_weights_are_refused(checkpoints, tmp_path):
    folder = copy_ckpt(checkpoints("qwen2_vl"), tmp_path / "c")
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(folder)


def test_no_weights(checkpoints, tmp_path):
    folder = copy_ckpt(checkpoints("qwen2_vl"), tmp_path / "c")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(folder)


def edit_config(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_config_errors_name_file_and_field(checkpoints, tmp_path):
    folder = copy_ckpt(checkpoints("qwen2_vl"), tmp_path / "c")
    edit_config(folder, lambda c: c.update(model_type="llava"))
    with pytest.raises(ConfigError, match=r"config.json: model_type 'llava' is not supported"):
        load_model(folder)
    edit_config(folder, lambda c: (c.update(model_type="qwen2_vl"), c.pop("num_hidden_layers")))
    with pytest.raises(
        ConfigError, match=r"config.json: missing required field 'num_hidden_layers'"
    ):
        load_model(folder)
    folder2 = copy_ckpt(checkpoints("qwen2_5_vl", layout="nested"), tmp_path / "d")
    edit_config(folder2, lambda c: c["vision_config"].pop("out_hidden_size"))
    with pytest.raises(
        ConfigError, match=r"vision_config\): missing required field 'out_hidden_size'"
    ):
        load_model(folder2)
    edit_config(folder2, lambda c: c["vision_config"].update(out_hidden_size="64"))
    with pytest.raises(ConfigError, match="out_hidden_size' must be"):
        load_model(folder2)
    (folder2 / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(folder2)


def test_unknown_dtype(checkpoints):
    with pytest.raises(ConfigError, match="unknown dtype 'int3'"):
        load_model(checkpoints("qwen2_vl"), dtype="int3")


def test_missing_folder_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        resolve_checkpoint(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="Download the checkpoint folder first"):
        resolve_checkpoint("Qwen/Qwen2-VL-2B-Instruct")


RSS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from qwenvl.checkpoint import load_model
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    with torch.device("meta"):  # the first meta-device init imports ~80 MB of torch modules:
        torch.nn.Embedding(2, 2)  # a one-time cost unrelated to the weights, kept out of the figure
    base = status("VmRSS")
    model, _ = load_model(sys.argv[1], dtype=sys.argv[2])
    print(status("VmHWM") - base)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_during_load(dtype, tmp_path):
    """Peak RSS growth while loading stays under 1.3x the loaded weights (no double copies)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    cfg_dict = {
        "model_type": "qwen2_vl",
        "vocab_size": 32000,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "torch_dtype": dtype,
        "vision_config": {
            "depth": 2,
            "embed_dim": 256,
            "num_heads": 4,
            "hidden_size": 512,
            "hidden_act": "quick_gelu",
            "mlp_ratio": 4,
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg_dict))
    cfg = parse_config(cfg_dict)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in get_family(cfg.family).build(cfg).state_dict().items()}
    tensors = {k: torch.randn(s).to(getattr(torch, dtype)) for k, s in shapes.items()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    save_file(tensors, tmp_path / "model.safetensors")
    del tensors
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path), dtype],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    growth = int(out.stdout.strip().splitlines()[-1])
    print(f"{dtype}: weights {nbytes / 2**20:.0f} MiB, peak RSS growth {growth / 2**20:.0f} MiB")
    assert growth < 1.3 * nbytes


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_activation_defaults_like_transformers(family):
    """The released Qwen2-VL config.json has no vision ``hidden_act``: transformers' default
    applies (quick_gelu for Qwen2-VL, silu for Qwen2.5-VL)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    vision = {"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 64, "mlp_ratio": 4}
    if family == "qwen2_5_vl":
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
            "window_size": 112,
            "tokens_per_second": 2,
        }
    cfg_dict = {
        "model_type": family,
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": vision,
    }
    hf = (Qwen2VLConfig if family == "qwen2_vl" else Qwen2_5_VLConfig)(**cfg_dict)
    assert parse_config(cfg_dict).vision.hidden_act == hf.vision_config.hidden_act


def test_released_7b_minimal_vision_config_takes_transformers_defaults():
    """Qwen2-VL-7B/72B-Instruct's config.json lists only three vision fields; every ViT
    dimension then comes from transformers' Qwen2VLVisionConfig defaults, parsed here by
    transformers itself from the same dict."""
    from transformers import Qwen2VLConfig

    cfg_dict = {
        "model_type": "qwen2_vl",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14},
    }
    hf = Qwen2VLConfig(**cfg_dict).vision_config
    v = parse_config(cfg_dict).vision
    assert (v.depth, v.embed_dim, v.num_heads) == (hf.depth, hf.embed_dim, hf.num_heads)
    assert v.intermediate_size == int(hf.embed_dim * hf.mlp_ratio)
    assert (v.out_hidden_size, v.hidden_act) == (hf.hidden_size, hf.hidden_act)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size) == (
        hf.patch_size,
        hf.temporal_patch_size,
        hf.spatial_merge_size,
    )
    assert (v.depth, v.embed_dim, v.out_hidden_size) == (32, 1280, 3584)
