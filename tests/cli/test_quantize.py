"""``qwenvl quantize``: the command's arguments, its output summary and its refusals (a clear
``error:`` line and exit code 2, never a traceback, nothing left behind). What it writes is
checked in ``tests/models/test_quantized_export.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl import LLM
from qwenvl.cli.main import build_parser, main

SRC = Path(__file__).resolve().parents[2] / "src"


def quantize(src: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(src), "--output", str(out), *extra]


def leftovers(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}*"))


def test_registered_with_its_options() -> None:
    args = build_parser().parse_args(["quantize", "M", "--method", "int4", "--output", "O"])
    assert (args.method, args.layout, args.group_size) == ("int4", "gptq", 128)
    assert args.func.__name__ == "cmd_quantize"


def test_writes_and_summarises(checkpoints, tmp_path, capsys) -> None:
    src, out = checkpoints("qwen2_vl"), tmp_path / "awq"
    out.mkdir()  # an empty folder may be the output
    args = quantize(src, out, "--method", "int4", "--layout", "awq", "--group-size", "64")
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith(f"wrote {out}: awq int4 (group 64), 14 linears quantised")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq"
    assert LLM(out).weight_format == "awq:w4g64"
    assert not leftovers(out)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "int8", "--layout", "awq"], "the AWQ layout is 4-bit only"),
        (["--method", "int4", "--group-size", "128"], "does not divide the input width 64"),
        (["--method", "int4", "--layout", "awq", "--group-size", "-1"], "positive group size"),
    ],
)
def test_bad_choices_are_refused(extra, message, checkpoints, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(quantize(checkpoints("qwen2_vl"), out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists() and not leftovers(out)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "int3"], "invalid choice: 'int3'"),
        (["--method", "int4", "--group-size", "0"], "expected a positive integer or -1"),
        (["--method", "int4", "--layout", "exl2"], "invalid choice: 'exl2'"),
        ([], "the following arguments are required: --method"),
    ],
)
def test_usage_errors(extra, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(quantize(tmp_path / "m", tmp_path / "out", *extra))
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_output_in_use_is_refused(checkpoints, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(quantize(checkpoints("qwen2_vl"), out, "--method", "int4")) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_quantised_model_is_refused(checkpoints, tmp_path, capsys) -> None:
    first = tmp_path / "int8"
    args = ["--method", "int8", "--group-size", "32"]
    assert main(quantize(checkpoints("qwen2_vl"), first, *args)) == 0
    capsys.readouterr()
    assert main(quantize(first, tmp_path / "again", "--method", "int4")) == 2
    err = capsys.readouterr().err
    assert "already quantised (gptq:w8g32)" in err
    assert not (tmp_path / "again").exists()


def test_missing_model_is_refused(tmp_path, capsys) -> None:
    assert main(quantize(tmp_path / "nowhere", tmp_path / "out", "--method", "int4")) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err


def test_refusal_from_the_shell_has_no_traceback(checkpoints, tmp_path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qwenvl", "quantize", str(checkpoints("qwen2_vl"))]
    cmd += ["--method", "int4", "--group-size", "48", "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: group size 48 does not divide")
    assert not out.exists()
