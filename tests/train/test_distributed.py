"""Data parallel (DDP) and FSDP2 training under torchrun on the CPU (gloo), against the truth of
one process with the same global batch (batch x accumulation x ranks): per-step losses and the
exported weights; a 2-rank run killed with SIGKILL resumes on 2 ranks and on 1; two torchrun
"machines" on one box."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import sft_lines, write_images, write_jsonl
from processes import free_port

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
SRC = str(Path(__file__).parents[2] / "src")

SCRIPT = """
import json, os, signal, sys
sys.path.insert(0, {src!r})
from qwenvl.train import LoraOptions, TrainConfig, train
cfg, kill_after = json.loads(sys.argv[1]), int(sys.argv[2])
if cfg.get("lora"):
    cfg["lora"] = LoraOptions(**{{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in cfg["lora"].items()}})
def hook(step, metrics):
    if step == kill_after and int(os.environ.get("RANK", "0")) == 0:
        os.kill(os.getpid(), signal.SIGKILL)
train(TrainConfig(**cfg), on_step_end=hook if kill_after else None)
"""

# 13 units: the 4th step of an epoch has one row, so a rank pads it with a zero-weight pass
FULL = dict(lr=1e-3, batch_size=1, grad_accum=2, max_steps=10, pack=256,
            gradient_checkpointing=True, freeze_merger=True, save_every=2)  # fmt: skip
DPO = dict(method="dpo", lr=1e-4, batch_size=1, grad_accum=2, epochs=5, max_steps=10,
           dpo_beta=0.5, dpo_sft_weight=0.5)  # fmt: skip
LORA = dict(lr=1e-2, batch_size=1, grad_accum=2, epochs=3, max_steps=10,
            lora=dict(rank=4, alpha=8, dropout=0.0, parts=("llm", "vision")))  # fmt: skip


@pytest.fixture(scope="module")
def setup(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_images(root / "images")
    data = write_jsonl(root / "train.jsonl", sft_lines() * 3 + sft_lines()[:1])
    image = [{"type": "image", "image": "images/im0.png"}, {"type": "text", "text": "Colour?"}]
    pairs = [{"messages": [{"role": "user", "content": image if k % 2 else "Count."}],
              "chosen": f"{k} red boxes.", "rejected": f"The {k} blue ones, far."}
             for k in range(7)]  # fmt: skip
    dpo = write_jsonl(root / "dpo.jsonl", pairs)
    script = root / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(src=SRC)))
    return {"root": root, "data": str(data), "dpo": str(dpo), "script": script,
            "model": str(checkpoints("qwen2_vl")), "runs": {}}  # fmt: skip


def _config(setup, out: Path, extra: dict, world: int) -> dict:
    cfg = dict(extra)
    cfg["grad_accum"] = cfg["grad_accum"] * 2 // world  # the same global batch at any size
    cfg.setdefault("data", setup["data"])
    return dict(model=setup["model"], output=str(out), seed=5,
                progress=False, plot=False, data_workers=1, **cfg)  # fmt: skip


def _launch(setup, out: Path, cfg: dict, ranks: int, kill_after: int = 0, fsdp=False) -> int:
    """Run the training script on ``ranks`` processes (1: plain python, else torchrun; FSDP on
    one rank: torchrun with one process)."""
    cfg = {**cfg, "fsdp": fsdp}
    args = [str(setup["script"]), json.dumps(cfg), str(kill_after)]
    if ranks == 1 and not fsdp:
        cmd = [sys.executable, *args]
    else:
        port = free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-port", str(port), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, timeout=600, capture_output=True).returncode


def _run(setup, name: str, extra: dict, ranks: int, fsdp: bool = False) -> Path:
    """A finished run's folder (each configuration runs once per module)."""
    if name not in setup["runs"]:
        out = setup["root"] / name
        code = _launch(setup, out, _config(setup, out, extra, ranks), ranks, fsdp=fsdp)
        assert code == 0, f"{name} exited with {code}"
        setup["runs"][name] = out
    return setup["runs"][name]


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def _final(out: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model" if (out / "final" / "adapter_config.json").exists() else "model"
    return load_file(out / "final" / f"{name}.safetensors")


def _compare(ref: Path, other: Path, what: str) -> None:
    a, b = _losses(ref), _losses(other)
    assert a.keys() == b.keys() == set(range(1, 11))
    worst = max(abs(a[k] - b[k]) / abs(a[k]) for k in a)
    wa, wb = _final(ref), _final(other)
    assert wa.keys() == wb.keys()
    moved = max(float((wa[k].float() - load_file_base(ref, k)).abs().max()) for k in wa)
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    print(f"{what}: losses within {worst:.1e} relative, weights within {diff:.1e} "
          f"(training moved them by up to {moved:.1e})")  # fmt: skip
    assert worst <= LOSS_RTOL
    assert diff <= WEIGHT_ATOL < moved


def load_file_base(out: Path, key: str) -> torch.Tensor:
    """The starting value of an exported tensor (0 for a LoRA tensor: B starts at 0, and A's
    start does not matter for the comparison's scale)."""
    if "lora_" in key:
        return torch.zeros(())
    cfg = json.loads((out / "train_config.json").read_text())
    return load_file(Path(cfg["model"]) / "model.safetensors")[key].float()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_full_finetune_on_2_ranks_matches_one_process(setup, fsdp):
    """Packing, accumulation, clipping, a frozen part, gradient checkpointing, more steps than
    the epoch holds, and a step with less data than ranks."""
    ref = _run(setup, "full-1", FULL, 1)
    other = _run(setup, f"full-{'fsdp' if fsdp else 'ddp'}", FULL, 2, fsdp)
    _compare(ref, other, f"full {'FSDP' if fsdp else 'DDP'} x2")


def test_fsdp_on_one_rank_matches_one_process(setup):
    """``torchrun --nproc-per-node 1 ... --fsdp`` (one GPU, for FSDP2's mixed-precision policy)
    joins a group of one and trains like a plain process."""
    ref = _run(setup, "full-1", FULL, 1)
    _compare(ref, _run(setup, "full-fsdp1", FULL, 1, True), "full FSDP x1")


def test_lora_fsdp_on_2_ranks_matches_one_process(setup):
    """Adapters on the language model and the ViT (rows without a picture still reduce the
    ViT's gradients on every rank). LoRA under DDP: the two-machine test below."""
    ref = _run(setup, "lora-1", LORA, 1)
    _compare(ref, _run(setup, "lora-fsdp", LORA, 2, True), "LoRA FSDP x2")


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_dpo_on_2_ranks_matches_one_process(setup, fsdp):
    """DPO with the SFT term, full fine-tuning: the frozen reference is a replica (DDP) or
    sharded like the policy (FSDP)."""
    ref = _run(setup, "dpo-1", DPO | {"data": setup["dpo"]}, 1)
    other = _run(setup, f"dpo-{'fsdp' if fsdp else 'ddp'}", DPO | {"data": setup["dpo"]}, 2, fsdp)
    _compare(ref, other, f"DPO {'FSDP' if fsdp else 'DDP'} x2")


def test_sigkill_on_2_ranks_resumes_on_2_and_on_1(setup):
    """The FSDP run killed after step 5 (its newest checkpoint: step 4) resumes on 2 ranks and
    on 1 and continues the uninterrupted run's curve."""
    straight = _run(setup, "full-fsdp", FULL, 2, True)
    killed = setup["root"] / "killed"
    cfg = _config(setup, killed, FULL, 2)
    assert _launch(setup, killed, cfg, 2, kill_after=5, fsdp=True) != 0
    assert (killed / "checkpoints" / "step-000004" / "state.pt").is_file()
    assert not (killed / "final").exists()
    for ranks in (2, 1):
        out = setup["root"] / f"resumed-{ranks}"
        subprocess.run(["cp", "-r", str(killed), str(out)], check=True)
        cfg = {**_config(setup, out, FULL, ranks), "resume": "latest"}
        assert _launch(setup, out, cfg, ranks, fsdp=ranks > 1) == 0
        a, b = _losses(straight), _losses(out)
        worst = max(abs(a[k] - b[k]) / abs(a[k]) for k in a)
        print(f"killed at step 5, resumed from step 4 on {ranks} rank(s): losses within "
              f"{worst:.1e} relative of the uninterrupted run")  # fmt: skip
        assert a.keys() == b.keys() and worst <= LOSS_RTOL


def test_two_machines_on_one_box(setup):
    """``torchrun --nnodes 2 --node-rank 0|1 --rdzv-endpoint 127.0.0.1:PORT``, one rank each:
    LoRA under DDP across two "machines"."""
    ref = _run(setup, "lora-1", LORA, 1)
    out = setup["root"] / "two-nodes"
    cfg = json.dumps({**_config(setup, out, LORA, 2), "fsdp": False})
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(node),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "two-nodes",
                str(setup["script"]),
                cfg,
                "0",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for node in (0, 1)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:] if p.stderr else ""
    _compare(ref, out, "LoRA DDP over 2 torchrun nodes")


def test_fsdp_needs_torchrun(setup, tmp_path):
    from qwenvl.errors import ConfigError
    from qwenvl.train import TrainConfig, Trainer

    with pytest.raises(ConfigError, match="torchrun"):
        Trainer(TrainConfig(**{**_config(setup, tmp_path / "o", LORA, 1), "lora": None,
                               "fsdp": True}))  # fmt: skip
    assert not (tmp_path / "o").exists()
