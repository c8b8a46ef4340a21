"""The checks that need a GPU, as one prepared run within a time budget (a lent GPU comes with
minutes, not hours): ``python bench/gpu_check.py --out DIR --budget 540``.

1. The demo recipe's ``tools`` stage (issue 27's click task) from the shipped weights, with as
   many steps as fit the budget after a short probe of the step time (the cosine schedule needs
   the count up front); then ``eval-demo --tasks click`` on 300 held-out scenes.
2. Fine-tuning on the GPU (issue 24), the trial task of ``bench/finetune_french.py``: full
   fine-tuning for 3 epochs in one process (bf16 autocast), and the same under
   ``torchrun --nproc-per-node 1 --fsdp --gradient-checkpointing`` (NCCL, FSDP2 with its bf16
   mixed-precision policy); held-out greedy accuracy of each.
3. If time is left, every shipped ``eval-demo`` task on the new model.

Everything lands in ``--out`` (``results.json``, logs, the new model); each part has its own
timeout so one failure leaves the others' results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

PY = sys.executable
START = time.monotonic()


def left(budget: float) -> float:
    return budget - (time.monotonic() - START)


def run(cmd: list[str], log: Path, timeout: float) -> bool:
    """Run ``cmd`` with its output in ``log``; False when it failed or ran out of time."""
    t0 = time.monotonic()
    print(f"[{time.monotonic() - START:6.1f}s] {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(timeout, 1))
            ok = rc.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
    print(f"   -> {'ok' if ok else 'FAILED'} in {time.monotonic() - t0:.1f}s", flush=True)
    if not ok:
        print("".join(log.read_text().splitlines(True)[-25:]), flush=True)
    return ok


def tools_stage(out: Path, work: Path, device: str, budget: float, cap: int) -> dict:
    from qwenvl.demo import default_model_path

    demo = str(default_model_path())
    skip = ["--vision-steps", "0", "--read-steps", "0", "--joint-steps", "0",
            "--polish-steps", "0"]  # fmt: skip
    base = [PY, "-m", "qwenvl.demo.train", "--init", demo, "--device", device, *skip]
    probe = work / "probe"
    if not run([*base, "--out", str(probe), "--tools-steps", "6"], out / "probe.log", 240):
        return {"error": "probe failed"}
    secs = [json.loads(x)["secs"] for x in (probe / "metrics.jsonl").read_text().splitlines()]
    per_step = (secs[-1] - secs[1]) / (len(secs) - 2)
    reserve = 150  # the click eval and the fine-tuning checks
    steps = min(cap, int(max(50, (left(budget) - reserve - 30) / per_step)) // 50 * 50)
    result = {"per_step_s": round(per_step, 3), "steps": steps}
    run_dir = work / "tools"
    cmd = [*base, "--out", str(run_dir), "--tools-steps", str(steps)]
    result["trained"] = run(cmd, out / "tools.log", left(budget) - reserve + 60)
    model = run_dir / "model"
    if (model / "model.safetensors").is_file():
        (out / "model").mkdir(exist_ok=True)
        for f in model.iterdir():
            (out / "model" / f.name).write_bytes(f.read_bytes())
    if (run_dir / "metrics.jsonl").is_file():
        (out / "tools_metrics.jsonl").write_bytes((run_dir / "metrics.jsonl").read_bytes())
    return result


def eval_demo(
    out: Path, name: str, tasks: str, device: str, timeout: float, count: int
) -> dict | None:
    cmd = [PY, "-m", "qwenvl", "eval-demo", "--model", str(out / "model"), "--count", str(count),
           "--json", "--device", device, "--dtype", "float32"]  # fmt: skip
    if tasks:
        cmd += ["--tasks", tasks]
    log = out / f"{name}.log"
    if not run(cmd, log, timeout):
        return None
    text = log.read_text()
    return json.loads(text[text.index("{") :])


def fine_tuning(out: Path, work: Path, budget: float, dry: bool) -> dict:
    """The French trial task: one GPU, then FSDP2 on one rank under torchrun."""
    import finetune_french as fr
    from qwenvl.demo import default_model_path

    data = work / "fr" / "data"
    fr.write_split(data, "train", 16 if dry else 1200, fr.TRAIN_SEED)
    fr.write_split(data, "heldout", 8 if dry else 200, fr.HELDOUT_SEED)
    extra = fr.STAGES["full3"][2] + (["--max-steps", "2", "--epochs", "1"] if dry else [])
    common = ["--model", str(default_model_path()), "--data", str(data / "train.jsonl"),
              "--eval-data", str(data / "heldout.jsonl"), *fr.COMMON, *extra]  # fmt: skip
    result = {}
    for name, launcher, more in (
        ("one_gpu", [PY, "-m", "qwenvl", "train"], []),
        ("fsdp_1rank", [PY, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                        "-m", "qwenvl", "train"], ["--fsdp", "--gradient-checkpointing"]),
    ):  # fmt: skip
        folder = work / "fr" / name
        t0 = time.monotonic()
        ok = run([*launcher, *common, *more, "--output", str(folder)], out / f"{name}.log",
                 min(150, left(budget) - 20))  # fmt: skip
        row: dict = {"ok": ok, "seconds": round(time.monotonic() - t0, 1)}
        if ok:
            row["heldout_greedy_accuracy"] = fr.greedy_accuracy(
                folder / "final", data / "heldout.jsonl"
            )
            rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
            row["last_eval_loss"] = [r for r in rows if "eval_loss" in r][-1]["eval_loss"]
        result[name] = row
        print(json.dumps({name: row}), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"))
    ap.add_argument("--budget", type=float, default=540, help="seconds for everything")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-tools-steps", type=int, default=2000)
    ap.add_argument("--dry", action="store_true", help="tiny sizes: try the script on a CPU")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    import torch

    count = 4 if a.dry else 300
    results: dict = {"torch": torch.__version__}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()

    def save() -> None:
        (a.out / "results.json").write_text(json.dumps(results, indent=2))

    results["tools"] = tools_stage(a.out, a.work, a.device, a.budget, a.max_tools_steps)
    save()
    if (a.out / "model" / "model.safetensors").is_file():
        results["click_eval"] = eval_demo(a.out, "click_eval", "click", a.device, 120, count)
        save()
    if left(a.budget) > 60:
        results["fine_tuning"] = fine_tuning(a.out, a.work, a.budget, a.dry)
        save()
    if left(a.budget) > 60 and (a.out / "model" / "model.safetensors").is_file():
        timeout = left(a.budget) - 10
        results["eval_demo"] = eval_demo(a.out, "eval_demo", "", a.device, timeout, count)
        save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
