from __future__ import annotations

import torch

from conftest import write_images  # noqa: F401
from qwenvl.checkpoint import load_model
from qwenvl.cli.main import main


def test_train_lora_then_merge_lora(checkpoints, sft_file, tmp_path, capsys):
    base = checkpoints("qwen2_vl")
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        str(base),
        "--data",
        str(sft_file),
        "--output",
        str(out),
        "--lora",
        "--lora-rank",
        "4",
        "--lora-targets",
        "q_proj,v_proj,qkv",
        "--lr",
        "1e-2",
        "--pack",
        "256",
        "--overlong",
        "split",
        "--epochs",
        "5",
        "--max-steps",
        "3",
        "--freeze-vision",
        "--gradient-checkpointing",
        "--save-every",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert (out / "checkpoints" / "step-000002" / "state.pt").is_file()
    assert (out / "loss.png").is_file()
    merged = tmp_path / "merged"
    argv = [
        "merge-lora",
        "--model",
        str(base),
        "--adapter",
        str(out / "final"),
        "--output",
        str(merged),
    ]
    assert main(argv) == 0
    from qwenvl.train.lora import load_adapter

    m_merged, _ = load_model(merged, dtype="float32")
    m_adapter, _ = load_model(base, dtype="float32")
    modules = load_adapter(m_adapter, out / "final")
    assert modules and not any(n.startswith("visual.") for n in modules)  # vision was frozen
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    pos = torch.arange(6).view(1, 1, 6).expand(3, 1, 6)
    with torch.no_grad():
        diff = (m_merged(ids, pos) - m_adapter(ids, pos)).abs().max()
    assert diff <= 1e-5
