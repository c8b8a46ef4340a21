"""Decode GEMV throughput on the CPU: GB/s of weight bytes streamed, against DRAM read bandwidth.

    PYTHONPATH=src python bench/gemv.py                      # all shapes, M = 1, 4, 8
    PYTHONPATH=src python bench/gemv.py --shapes 8960x1536 --m 1 4 --threads 2

Each row times y = x @ W.T for one (N, K) weight shape and M rows of x, rotating round-robin over
enough distinct weight matrices (>= 8, >= --pool-mb in all) that the 32 MB L3 never holds them, so
every call streams its weights from DRAM. The reference is a 512 MiB fp32 ``sum`` (best of 7).
Columns are GB/s of the weight's own bytes (fp32: 4 B, bf16: 2 B, int8: 1 B per element) and, for
ours, the fraction of the read bandwidth; "int8 tiled" is the layout PackedLinear stores when the
shape allows (``kernels.tile_int8``: one stream per 8 rows), "int8" the row layout; the last
column is our bf16 time at M over M=1.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from qwenvl import kernels

SHAPES = [(1536, 1536), (8960, 1536), (1536, 8960), (151936, 1536)]


def read_bandwidth(reps: int = 7) -> float:
    """Best-of GB/s of a 512 MiB fp32 sum: what the machine can stream, with all threads."""
    a = torch.ones(512 * 2**20 // 4)
    a.sum()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best / 1e9


def time_per_call(fn: Callable[[int], object], count: int, reps: int) -> float:
    """Best (over reps) mean seconds per call of one round-robin pass over `count` matrices."""
    for i in range(count):
        fn(i)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(count):
            fn(i)
        best = min(best, (time.perf_counter() - t) / count)
    return best


def bench_shape(n: int, k: int, ms: list[int], pool_mb: float, reps: int, bw: float) -> None:
    numel = n * k

    def pool(nbytes_per: int) -> int:
        return max(8, math.ceil(pool_mb * 1e6 / (numel * nbytes_per))) if numel * 4 < 256e6 else 1

    g = torch.Generator().manual_seed(0)
    w32 = [torch.randn(n, k, generator=g) * 0.02 for _ in range(pool(4))]
    w16 = [torch.randn(n, k, generator=g).mul_(0.02).bfloat16() for _ in range(pool(2))]
    q, s = kernels.quantize_int8(w16[0])
    q8 = [q] + [q.clone() for _ in range(pool(1) - 1)]  # values do not matter, bytes do
    q8t = [kernels.tile_int8(t) for t in q8] if kernels.can_tile(n, k) else q8
    s8, s8b = s, s.bfloat16()

    def cases(x32: torch.Tensor, x16: torch.Tensor) -> dict[str, tuple[int, int, Callable]]:
        """name -> (bytes per weight element, matrices in the pool, call on matrix i)."""
        return {
            "torch fp32": (4, len(w32), lambda i: torch.nn.functional.linear(x32, w32[i])),
            "torch bf16": (2, len(w16), lambda i: torch.nn.functional.linear(x16, w16[i])),
            "ours bf16": (2, len(w16), lambda i: kernels.linear_bf16(x32, w16[i])),
            "torch int8pack": (1, len(q8), lambda i: torch._weight_int8pack_mm(x16, q8[i], s8b)),
            "ours int8": (1, len(q8), lambda i: kernels.linear_int8(x32, q8[i], s8)),
            "ours int8 tiled": (1, len(q8t), lambda i: kernels.linear_int8(x32, q8t[i], s8)),
        }

    t_m1 = None
    for m in ms:
        x32 = torch.randn(m, k, generator=g)
        with torch.inference_mode():
            cs = cases(x32, x32.bfloat16())
            secs = {name: time_per_call(fn, cnt, reps) for name, (_, cnt, fn) in cs.items()}
        gbs = {name: cs[name][0] * numel / t / 1e9 for name, t in secs.items()}
        if m == 1:
            t_m1 = secs["ours bf16"]
        ratio = f"{secs['ours bf16'] / t_m1:.2f}" if t_m1 else "-"
        cells = [f"{gbs[name]:.1f}" for name in cs]
        cells.insert(3, f"{gbs['ours bf16'] / bw:.0%}")
        cells.insert(6, f"{gbs['ours int8'] / bw:.0%}")
        cells.append(f"{gbs['ours int8 tiled'] / bw:.0%}")
        int8_speedup = secs["ours bf16"] / secs["ours int8 tiled"]
        print(
            f"| {n}x{k} | {m} | " + " | ".join(cells) + f" | {int8_speedup:.2f} | {ratio} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=[f"{n}x{k}" for n, k in SHAPES])
    ap.add_argument("--m", nargs="*", type=int, default=[1, 4, 8])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--pool-mb", type=float, default=320.0, help="weight bytes per format")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("qwenvl kernels unavailable (see the warning above)")
    bw = read_bandwidth()
    print(f"threads {args.threads}, ISA {kernels.isa()}, read bandwidth {bw:.1f} GB/s\n")
    print(
        "| N x K | M | torch fp32 | torch bf16 | ours bf16 | of bw | torch int8pack | ours int8 "
        "| of bw | ours int8 tiled | of bw | bf16/int8 tiled time | bf16 M/M=1 |"
    )
    print("| --- " * 13 + "|")
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        bench_shape(n, k, args.m, args.pool_mb, args.reps, bw)


if __name__ == "__main__":
    main()
