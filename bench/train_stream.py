"""Streaming training data vs the in-memory path it replaced: memory over a run, time to the
first step, throughput (samples/s).

    python bench/train_stream.py                      # 20,000 demo scenes
    python bench/train_stream.py --data /tmp/d20k --subset 2000 --subset-steps 50 --old e1eec09

Each run is a child process training the demo model (``qwenvl.demo``) with batch 4, its RSS
(the trainer plus its DataLoader workers, summed over /proc) sampled after every step. On the
whole generated file: the data path alone (index, then every step's batches decoded by 2
workers, 2 steps ahead) over one epoch, RSS every 50 steps; then a few training steps (time to
the first one). Both paths are then timed side by side, twice, on the first ``--subset`` lines,
the in-memory one with the trainer of commit ``--old`` (from ``git archive``), which encodes
every sample, pixels included, before step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = 0  # the trainer's threads (--trainer-threads; 0: PyTorch's default, one per core)

CHILD = r"""
import json, os, sys, time
t_start = time.perf_counter()
from pathlib import Path
import qwenvl
from qwenvl.train import TrainConfig, Trainer

TICK = os.sysconf("SC_CLK_TCK")

def usage(pid):
    # RSS MiB and CPU seconds (user + system) of pid and its live descendants, plus the CPU of
    # the children it has reaped (the index pass's workers)
    total, cpu, todo = 0, 0.0, [pid]
    kids = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                kids.setdefault(int(open(f"/proc/{e}/stat").read().rsplit(")", 1)[1].split()[1]),
                                []).append(int(e))
            except (OSError, IndexError, ValueError):
                pass
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            stat = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            cpu += sum(int(x) for x in stat[11:15 if p == pid else 13]) / TICK
        except (OSError, IndexError, ValueError):
            pass
    return total / 1024, cpu

args = json.loads(sys.argv[1])
if args.get("threads"):  # the trainer's intra-op threads (the data workers use one each)
    import torch
    torch.set_num_threads(args["threads"])
extra = {"data_workers": 2, "prefetch": 2} if args["stream"] else {}
demo = Path(qwenvl.__file__).parent / "data" / "demo-model"
cfg = TrainConfig(model=str(demo), data=args["data"], output=args["out"],
                  lr=1e-4, batch_size=4, max_steps=args["steps"] or None, progress=False,
                  plot=False, seed=0, **extra)
log = []
def hook(step, m):
    log.append((step, time.perf_counter() - t_start, m.get("samples", 4), *usage(os.getpid())))
index_s = []
if hasattr(Trainer, "_index"):  # the streaming trainer: time its index pass
    _index = Trainer._index
    def timed(self, path):
        t = time.perf_counter()
        out = _index(self, path)
        index_s.append(time.perf_counter() - t)
        return out
    Trainer._index = timed
batch_at = []
if hasattr(Trainer, "_train_step"):  # when the first step's data reached the model
    _train_step = Trainer._train_step
    def first(self, *a, **k):
        batch_at.append(batch_at[0] if batch_at else time.perf_counter() - t_start)
        return _train_step(self, *a, **k)
    Trainer._train_step = first
load = [open("/proc/loadavg").read().split()[0]]
t0 = time.perf_counter()
trainer = Trainer(cfg, on_step_end=hook)
t_init = time.perf_counter() - t0
if args["data_only"]:  # the data path alone over a whole epoch: what streaming changes
    trainer.total_steps = trainer.plan.steps_in(0)
    for share in trainer._steps():
        if share.step % 50 == 0:
            hook(share.step + 1, {"samples": share.samples})
else:
    trainer.run()
load.append(open("/proc/loadavg").read().split()[0])
print(json.dumps({"init_s": t_init, "import_s": t0 - t_start, "index_s": sum(index_s) or None,
                  "batch_at": batch_at[0] if batch_at else None, "load": load, "log": log}))
"""


def child(data: Path, steps: int, stream: bool, src: Path, data_only: bool = False) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    spec = json.dumps({"data": str(data), "out": str(out / "run"), "steps": steps,
                       "stream": stream, "data_only": data_only,
                       "threads": THREADS})  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run([sys.executable, "-c", CHILD, spec], env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(name: str, r: dict, skip: int = 3) -> None:
    """One table row: index, init, first step, samples/s and CPU seconds per sample after
    ``skip`` steps of the log, RSS, and the load average (1 min) when the run started and
    ended."""
    log = r["log"]
    steady = log[skip:] if len(log) > skip + 1 else log
    samples = (steady[-1][0] - steady[0][0]) * 4
    rate = samples / max(steady[-1][1] - steady[0][1], 1e-9)
    cpu = (steady[-1][4] - steady[0][4]) / max(samples, 1)
    rss = [e[3] for e in log]
    quart = [rss[int(q * (len(rss) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)]
    index = f"{r['index_s']:.1f}" if r.get("index_s") else "-"
    batch = f"{r['batch_at']:.1f}" if r.get("batch_at") else "-"
    print(
        f"| {name} | {index} | {r['init_s']:.1f} | {batch} | {log[0][1]:.1f} | {rate:.2f} | "
        f"{cpu:.2f} | "
        f"{' / '.join(f'{m:.0f}' for m in quart)} | {max(rss) - min(rss):.0f} | "
        f"{' -> '.join(r['load'])} |",
        flush=True,
    )


def old_tree(commit: str) -> Path:
    """The package as it was at ``commit`` (``git archive``: no worktree, nothing to clean)."""
    path = Path(tempfile.mkdtemp(prefix="qwenvl-old-"))
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], check=True,
                         capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(path)], input=tar, check=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=10, help="training steps on the whole file")
    ap.add_argument("--subset", type=int, default=1200, help="lines for the side-by-side runs")
    ap.add_argument("--subset-steps", type=int, default=20)
    ap.add_argument("--old", default="e1eec09", help="commit of the in-memory trainer")
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bench-demo20k")
    ap.add_argument("--rounds", type=int, default=2, help="alternating side-by-side rounds")
    ap.add_argument("--no-epoch", action="store_true", help="skip the whole-epoch RSS run")
    ap.add_argument("--side-by-side-only", action="store_true", help="only the subset rounds")
    ap.add_argument("--trainer-threads", type=int, default=0,
                    help="the trainer's torch threads (0: one per core)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.trainer_threads
    data = args.data / "data.jsonl"
    if not data.exists():
        from qwenvl.demo.tasks import write_jsonl

        t = time.perf_counter()
        write_jsonl(args.data, args.samples, 7)
        print(f"wrote {args.samples} samples in {time.perf_counter() - t:.0f} s")
    subset = args.data / f"first{args.subset}.jsonl"
    with open(data) as f, open(subset, "w") as g:
        g.writelines(line for _, line in zip(range(args.subset), f))
    print(
        "| run | index s | init s (index, or encode all; + load) | first batch at s "
        "| first step done at s | samples/s | CPU s/sample "
        "| RSS MiB at 0/25/50/75/100 % of the log | spread MiB | load avg, start -> end |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    n = sum(1 for _ in open(data))
    if not (args.no_epoch or args.side_by_side_only):
        summary(f"streaming, {n} lines, data path only, one epoch (RSS every 50 steps)",
                child(data, 0, True, ROOT / "src", data_only=True))  # fmt: skip
    if not args.side_by_side_only:
        summary(f"streaming, {n} lines, {args.steps} training steps",
                child(data, args.steps, True, ROOT / "src"))  # fmt: skip
    tree = old_tree(args.old)
    for _ in range(args.rounds):  # alternating, as the machine's load varies
        summary(f"in-memory ({args.old}), {args.subset} lines, {args.subset_steps} steps",
                child(subset, args.subset_steps, False, tree / "src"))  # fmt: skip
        summary(f"streaming, {args.subset} lines, {args.subset_steps} steps",
                child(subset, args.subset_steps, True, ROOT / "src"))  # fmt: skip


if __name__ == "__main__":
    main()
