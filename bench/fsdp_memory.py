"""FSDP memory per rank on the exact Qwen2-VL-2B shape: 1 process vs 2 ranks (gloo, CPU).

    python bench/fsdp_memory.py                   # both parts below
    python bench/fsdp_memory.py --skip-measured   # the sharded state sizes only (seconds)

1. State sizes: the model is built on the meta device and sharded exactly as ``--fsdp`` shards
   it (``qwenvl.train.distributed.shard``); each rank counts its local parameter, gradient and
   AdamW (2 moments) bytes in fp32, for full fine-tuning and for LoRA (rank 16 on the language
   model's projections). Nothing is allocated, so the 2B shape needs no memory.
2. Measured: what fits on a 24 GiB machine. Full fine-tuning of 2.2 B parameters with AdamW in
   fp32 needs ~33 GiB in one process, so the real run is LoRA (rank 16) over bf16 base weights,
   1 process and 2 FSDP ranks, each loaded, sharded and its AdamW state made; each rank reports
   its RSS, peak RSS, and the bytes of its local parameters and optimizer state (no activations:
   a bf16 training step of this shape takes ~10 min on the shared 2-core CPU).

The random-weight checkpoint comes from ``bench/released_shapes.py`` (built once, ~4.4 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_sizes(folder: Path, lora: bool) -> dict:
    """This rank's fp32 bytes of parameters, gradients and AdamW moments (meta device)."""
    from qwenvl.checkpoint import load_config
    from qwenvl.models import family_of
    from qwenvl.train import LoraOptions
    from qwenvl.train.distributed import join, wrap
    from qwenvl.train.lora import apply_lora

    ranks, _ = join("cpu")
    config = load_config(folder)
    with torch.device("meta"):
        model = family_of(config).build(config)
    if lora:
        apply_lora(model, LoraOptions(rank=16, alpha=32))
    wrap(model, ranks, fsdp=ranks.distributed, bf16=False)
    params = sum(_local(p).numel() for p in model.parameters()) * 4
    trained = sum(_local(p).numel() for p in model.parameters() if p.requires_grad) * 4
    return {"rank": ranks.rank, "ranks": ranks.size, "lora": lora, "params": params,
            "grads": trained, "adam": 2 * trained}  # fmt: skip


def measured(folder: Path, out: Path) -> dict:
    """This rank's memory once the model is loaded, sharded (2 ranks) and AdamW's state exists
    (one optimizer step on zero gradients, as ``torch.distributed.checkpoint`` initialises it):
    a CPU forward/backward of the 2B shape in bf16 takes ~10 min a step on the shared 2 cores,
    so activations are not included."""
    from qwenvl.train import LoraOptions, TrainConfig, Trainer

    trainer = Trainer(
        TrainConfig(model=str(folder), data=str(out.parent / "text.jsonl"), output=str(out),
                    dtype="bfloat16", lora=LoraOptions(rank=16, alpha=32), lr=1e-4,
                    progress=False, plot=False, data_workers=0,
                    fsdp=int(os.environ.get("WORLD_SIZE", "1")) > 1),
    )  # fmt: skip
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    params = sum(_local(p).numel() * p.element_size() for p in trainer.model.parameters())
    optim = sum(
        _local(v).numel() * v.element_size()
        for s in trainer.optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    return {"rank": trainer.ranks.rank, "ranks": trainer.ranks.size, "params": params,
            "optim": optim, "rss": int(status["VmRSS"].split()[0]) * 1024,
            "hwm": int(status["VmHWM"].split()[0]) * 1024}  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], ranks: int) -> list[dict]:
    cmd = [sys.executable, __file__, *args]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-port", str(_free_port()), __file__, *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return [json.loads(x[5:]) for x in done.stdout.splitlines() if x.startswith("JSON ")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="default: bench/released_shapes.py's 2B")
    ap.add_argument("--skip-measured", action="store_true")
    ap.add_argument("--child", choices=["sizes", "sizes-lora", "measured"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.child:
        result = (measured(args.checkpoint, args.out) if args.child == "measured"
                  else state_sizes(args.checkpoint, args.child == "sizes-lora"))  # fmt: skip
        print("JSON " + json.dumps(result), flush=True)
        return
    folder = args.checkpoint
    if folder is None:
        sys.path.insert(0, str(ROOT / "bench"))
        from released_shapes import build_checkpoint

        folder = build_checkpoint(Path(tempfile.gettempdir()) / "qwenvl-bench", "qwen2_vl", "full")
    print("| state (fp32) | ranks | params GiB | grads GiB | AdamW GiB | total per rank GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in ("sizes", "sizes-lora"):
        for n in (1, 2):
            for r in launch(["--child", kind, "--checkpoint", str(folder)], n):
                total = (r["params"] + r["grads"] + r["adam"]) / GiB
                print(f"| {'LoRA r16' if r['lora'] else 'full'} | rank {r['rank']} of {n} | "
                      f"{r['params'] / GiB:.2f} | {r['grads'] / GiB:.2f} | "
                      f"{r['adam'] / GiB:.2f} | {total:.2f} |", flush=True)  # fmt: skip
    if args.skip_measured:
        return
    work = Path(tempfile.mkdtemp(prefix="fsdp-mem-"))
    line = {"messages": [{"role": "user", "content": "Name three colours."},
                         {"role": "assistant", "content": "Red, green and blue."}]}  # fmt: skip
    (work / "text.jsonl").write_text((json.dumps(line) + "\n") * 4)
    print(
        "\n| LoRA r16, bf16 weights, AdamW state made | ranks | local params GiB | optimizer GiB "
        "| RSS GiB | peak RSS GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for n in (1, 2):
        out = work / f"run{n}"
        for r in launch(["--child", "measured", "--checkpoint", str(folder), "--out", str(out)], n):
            print(f"| | rank {r['rank']} of {n} | {r['params'] / GiB:.2f} | "
                  f"{r['optim'] / GiB:.3f} | {r['rss'] / GiB:.2f} | {r['hwm'] / GiB:.2f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
