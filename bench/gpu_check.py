"""The checks that need a GPU, as one prepared run within a time budget (a lent GPU comes with
minutes, not hours): ``python bench/gpu_check.py --out DIR --budget 500``.

1. The demo recipe's tool stages (issue 27's click task) from the shipped weights: a short probe
   of the step time (the cosine schedules need their lengths up front), then a few stage chains
   side by side on the one GPU, each scaled to the budget; ``eval-demo --tasks click`` (the click
   inside the block, and the confirmation after the tool's result) on 300 held-out scenes each.
2. Fine-tuning on the GPU (issue 24), the trial task of ``bench/finetune_french.py``, beside the
   chains: full fine-tuning for 3 epochs in one process (bf16 autocast), and the same under
   ``torchrun --nproc-per-node 1 --fsdp --gradient-checkpointing`` (NCCL, FSDP2 with its bf16
   mixed-precision policy); held-out greedy accuracy of each.

Everything lands in ``--out``: ``results.json``, ``logs.tar.gz`` and each chain's weights
(``<chain>.safetensors``; the rest of the folder is the shipped model's). Each part has its own
deadline, so one failure leaves the others' results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

PY = sys.executable
START = time.monotonic()
SKIP = ["--vision-steps", "0", "--read-steps", "0", "--joint-steps", "0", "--polish-steps", "0"]
# chain -> stage steps at one step a second; scaled to the budget (the session-16 CPU chain
# was tools 250, tools2 300 of 800, settle 250, settle2 120)
CHAINS = {
    "chain": {"tools": 250, "tools2": 800, "settle": 250, "settle2": 120},
    "short": {"tools": 400, "settle": 300, "settle2": 120},
    "settle": {"settle": 700, "settle2": 120},
}


def left(budget: float) -> float:
    return budget - (time.monotonic() - START)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    print(f"[{time.monotonic() - START:6.1f}s] {' '.join(map(str, cmd))}", flush=True)
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, deadline: float) -> bool:
    """Wait for ``proc`` until ``deadline`` (monotonic); False when it failed or was late."""
    try:
        ok = proc.wait(timeout=max(deadline - time.monotonic(), 1)) == 0
    except subprocess.TimeoutExpired:
        proc.kill()
        ok = False
    print(f"[{time.monotonic() - START:6.1f}s] {log.name}: {'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        print("".join(log.read_text().splitlines(True)[-20:]), flush=True)
    return ok


def recipe(out: Path, name: str, steps: dict[str, int], device: str) -> list[str]:
    from qwenvl.demo import default_model_path

    cmd = [PY, "-m", "qwenvl.demo.train", "--init", str(default_model_path()), "--device", device,
           "--out", str(out / name), *SKIP]  # fmt: skip
    for stage, n in steps.items():
        cmd += [f"--{stage}" if stage.endswith("-stop") else f"--{stage}-steps", str(n)]
    return cmd


def probe(work: Path, logs: Path, device: str) -> float:
    """Seconds per tools step (steps 2..6, past the start)."""
    p = start(recipe(work, "probe", {"tools": 6}, device), logs / "probe.log")
    if not finish(p, logs / "probe.log", time.monotonic() + 240):
        raise SystemExit("probe failed")
    secs = [json.loads(x)["secs"] for x in (work / "probe/metrics.jsonl").read_text().splitlines()]
    return (secs[-1] - secs[1]) / (len(secs) - 2)


def scaled(steps: dict[str, int], seconds: float, per_step: float, dry: bool) -> dict[str, int]:
    """The chain's stages scaled so the chain takes ``seconds``; tools2 keeps its schedule
    (800) and stops where its ``stop`` says (300), scaled likewise (``--tools2-stop``)."""
    if dry:
        return {k: 2 for k in steps}
    cost = sum(min(n, 300) if k == "tools2" else n for k, n in steps.items()) * per_step
    f = min(4.0, seconds / cost)
    out = {k: max(8, int(n * f)) for k, n in steps.items()}
    if "tools2" in steps:
        out["tools2-stop"] = max(8, int(300 * f))
    return out


def eval_click(work: Path, logs: Path, name: str, device: str, count: int) -> subprocess.Popen:
    cmd = [PY, "-m", "qwenvl", "eval-demo", "--model", str(work / name / "model"), "--json",
           "--count", str(count), "--device", device, "--dtype", "float32",
           "--tasks", "click"]  # fmt: skip
    return start(cmd, logs / f"eval_{name}.log")


def fine_tuning(work: Path, logs: Path, budget: float, dry: bool, result: dict) -> None:
    """The French trial task: one GPU, then FSDP2 on one rank under torchrun."""
    import finetune_french as fr

    from qwenvl.demo import default_model_path

    data = work / "fr" / "data"
    fr.write_split(data, "train", 16 if dry else 1200, fr.TRAIN_SEED)
    fr.write_split(data, "heldout", 8 if dry else 200, fr.HELDOUT_SEED)
    extra = fr.STAGES["full3"][2] + (["--max-steps", "2", "--epochs", "1"] if dry else [])
    common = ["--model", str(default_model_path()), "--data", str(data / "train.jsonl"),
              "--eval-data", str(data / "heldout.jsonl"), *fr.COMMON, *extra]  # fmt: skip
    for name, launcher, more in (
        ("one_gpu", [PY, "-m", "qwenvl", "train"], []),
        ("fsdp_1rank", [PY, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                        "-m", "qwenvl", "train"], ["--fsdp", "--gradient-checkpointing"]),
    ):  # fmt: skip
        folder, t0 = work / "fr" / name, time.monotonic()
        p = start([*launcher, *common, *more, "--output", str(folder)], logs / f"{name}.log")
        ok = finish(p, logs / f"{name}.log", START + budget - 40)
        row: dict = {"ok": ok, "seconds": round(time.monotonic() - t0, 1)}
        if ok:
            row["heldout_greedy_accuracy"] = fr.greedy_accuracy(
                folder / "final", data / "heldout.jsonl"
            )
            rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
            row["last_eval_loss"] = [r for r in rows if "eval_loss" in r][-1]["eval_loss"]
            row["steps"] = rows[-1].get("step")
        result[name] = row
        print(json.dumps({name: row}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"))
    ap.add_argument("--budget", type=float, default=500, help="seconds for everything")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry", action="store_true", help="tiny sizes: try the script on a CPU")
    ap.add_argument("--chains", default=",".join(CHAINS), help="which of CHAINS to run")
    a = ap.parse_args()
    logs = a.work / "logs"
    for d in (a.out, a.work, logs):
        d.mkdir(parents=True, exist_ok=True)
    import torch

    results: dict = {"torch": torch.__version__, "chains": {}, "fine_tuning": {}}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
    count = 4 if a.dry else 300
    tuning = threading.Thread(
        target=fine_tuning, args=(a.work, logs, a.budget, a.dry, results["fine_tuning"])
    )
    tuning.start()
    per_step = results["per_step_s"] = probe(a.work, logs, a.device)
    train_s = left(a.budget) - 110  # the click evals, the copies
    procs = {}
    for name in a.chains.split(","):
        steps = scaled(CHAINS[name], train_s, per_step * 1.3, a.dry)  # three side by side: slower
        results["chains"][name] = {"steps": steps}
        procs[name] = start(recipe(a.work, name, steps, a.device), logs / f"{name}.log")
    for name, p in procs.items():
        results["chains"][name]["trained"] = finish(p, logs / f"{name}.log", START + a.budget - 90)
    evals = {n: eval_click(a.work, logs, n, a.device, count) for n in procs
             if (a.work / n / "model/model.safetensors").is_file()}  # fmt: skip
    for name, p in evals.items():
        if finish(p, logs / f"eval_{name}.log", START + a.budget - 15):
            text = (logs / f"eval_{name}.log").read_text()
            results["chains"][name]["click"] = json.loads(text[text.index("{") :])
        weights = a.work / name / "model/model.safetensors"
        (a.out / f"{name}.safetensors").write_bytes(weights.read_bytes())
    tuning.join(timeout=max(left(a.budget), 1))
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    with tarfile.open(a.out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
        for name in CHAINS:
            m = a.work / name / "metrics.jsonl"
            if m.is_file():
                tar.add(m, arcname=f"metrics/{name}.jsonl")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
