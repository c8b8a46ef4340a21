"""Peak memory of ``encode_vision`` on a long video, one-shot vs chunked along time.

A Qwen2-VL-2B-shaped vision tower (width 1280, 16 heads, MLP 5120; ``--depth`` blocks, random
weights, fp32, CPU) encodes one video grid; each setting runs in its own child process and
reports its peak RSS during the call (``VmHWM`` after resetting it) above the RSS before the
call, and the seconds it took. Linux only.

    python bench/vision_chunks.py                      # grid 8x24x46 (8832 patches)
    python bench/vision_chunks.py --t 32 --chunks 0 16384 4416 1104
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def child(t: int, h: int, w: int, depth: int, chunk: int) -> dict[str, float]:
    import torch

    from qwenvl.models.qwen2_vl.config import ModelConfig, TextConfig, VisionConfig
    from qwenvl.models.qwen2_vl.model import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    text = TextConfig(
        vocab_size=16,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        mrope_section=(2, 3, 3),
    )
    vision = VisionConfig(
        depth=depth,
        embed_dim=1280,
        num_heads=16,
        intermediate_size=5120,
        out_hidden_size=64,  # = the (tiny) LLM width; the merger output is small anyway
        hidden_act="quick_gelu",
    )
    model = Qwen2VLForConditionalGeneration(ModelConfig("qwen2_vl", text, vision)).eval()
    model.vision_chunk_patches = chunk or None
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14)
    _reset_peak()  # so earlier transients (building the model) do not count
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    out = model.encode_vision(pixels, [(t, h, w)])
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    return {"seconds": seconds, "extra_mib": peak - before, "checksum": float(out.sum())}


def _reset_peak() -> None:
    """Reset this process's peak RSS (Linux: ``/proc/self/clear_refs``, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--t", type=int, default=8, help="temporal groups (frames / 2)")
    ap.add_argument("--h", type=int, default=24, help="patch rows (336 px)")
    ap.add_argument("--w", type=int, default=46, help="patch columns (644 px)")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 4416, 2208, 1104])
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.t, args.h, args.w, args.depth, args.child)))
        return
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    patches = args.t * args.h * args.w
    print(f"grid ({args.t}, {args.h}, {args.w}) = {patches} patches, depth {args.depth}, fp32 CPU")
    print(f"{'vision_chunk_patches':>20} {'seconds':>8} {'peak MiB':>9}  checksum")
    for chunk in args.chunks:
        cmd = [sys.executable, __file__, "--t", str(args.t), "--h", str(args.h)]
        cmd += ["--w", str(args.w), "--depth", str(args.depth), "--child", str(chunk)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        r = json.loads(out.strip().splitlines()[-1])
        name = "one-shot" if chunk == 0 else str(chunk)
        print(f"{name:>20} {r['seconds']:8.2f} {r['extra_mib']:9.0f}  {r['checksum']:.6g}")


if __name__ == "__main__":
    main()
