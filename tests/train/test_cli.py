from __future__ import annotations

import argparse
import json
import subprocess
import sys

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


def _train_parser():
    from qwenvl.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_train_option_has_help_and_shows_its_default():
    parser = _train_parser()
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        assert action.help, f"{flag} has no help text"
        if action.nargs != 0 and not action.required:  # takes a value: say what it is by default
            assert "(default" in action.help, f"{flag} does not show its default"
    # the defaults shown are the dataclass defaults, expanded by argparse
    for line in ("(default 1e-05)", "(default 0.0)", "(default --lr)", "(default llm)"):
        assert line in " ".join(text.split()), line


def _cli(args, cwd):
    """``qwenvl train`` in a subprocess whose stderr is a pipe, as under nohup or CI."""
    cmd = [sys.executable, "-m", "qwenvl", "train", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_progress_lines_off_a_terminal_and_where_resume_resumed(checkpoints, sft_file, tmp_path):
    out = tmp_path / "run"
    args = [
        "--model",
        checkpoints("qwen2_vl"),
        "--data",
        sft_file,
        "--output",
        out,
        "--lr",
        "1e-3",
        "--max-steps",
        "3",
        "--save-every",
        "2",
        "--log-every",
        "1",
    ]
    first = _cli(args, tmp_path)
    assert first.returncode == 0, first.stderr
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in first.stderr.splitlines() if x.startswith("step ")]
    assert "\r" not in first.stderr
    # one plain line per step, carrying the logged loss and learning rate
    assert [x.split()[1] for x in lines] == ["1/3", "2/3", "3/3"]
    for line, m in zip(lines, metrics):
        assert f"loss {m['loss']:.4f} lr {m['lr']:.2e}" in line and "samples/s" in line, line
        assert "ETA" in line
    again = _cli([*args, "--resume"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {out / 'checkpoints' / 'step-000002'} at step 2/3" in again.stderr
    assert [x.split()[1] for x in again.stderr.splitlines() if x.startswith("step ")] == ["3/3"]


def test_output_folder_is_not_created_when_the_run_is_refused(checkpoints, sft_file, tmp_path):
    out = tmp_path / "never"
    bad = ["--lora", "--lora-targets", "no_such_proj"]
    run = _cli(["--model", checkpoints("qwen2_vl"), "--data", sft_file, "--output", out, *bad],
               tmp_path)  # fmt: skip
    assert run.returncode == 2 and "no Linear module of llm matches" in run.stderr
    assert "Traceback" not in run.stderr and not out.exists()
    run = _cli(["--model", checkpoints("qwen2_vl"), "--data", tmp_path / "missing.jsonl",
                "--output", out], tmp_path)  # fmt: skip
    assert run.returncode != 0 and not out.exists()
