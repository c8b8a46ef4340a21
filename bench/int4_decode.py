"""int4 CPU decode: the GEMV against DRAM bandwidth, and decode tok/s against llama.cpp's Q4.

    PYTHONPATH=src python bench/int4_decode.py gemv [--m 1 4]
    PYTHONPATH=src python bench/int4_decode.py decode --ckpt CK [--llama-bin DIR --gguf Q4_0.gguf
        Q4_K_M.gguf Q8_0.gguf] [--rounds 3] [--modes int4 int4:head-int8 int8]

``gemv``: y = x @ W.T for the Qwen2-VL-2B decoder shapes, rotating over enough distinct weights
that L3 never holds them; GB/s of the weight's own bytes (int4: 0.53 B/weight with its fp16 scale
and min; int8 tiled: 1 B) and the fraction of the read bandwidth (a 512 MiB fp32 sum).

``decode``: in alternating rounds, qwenvl in each ``--modes`` (``int4``: ``quantization="int4"``
with the LM head bf16; ``int4:head-int8`` / ``int4:head-int4``: with ``head_quantization``;
``int8``) decoding 64 tokens after a 512-token prompt at batch 1 and 4 prompts at once (engine
stepped and timed as bench/cpu_speed.py and the peers' harness), and llama.cpp's ``llama-bench -t
2 -p 0 -n 64 -d 512`` (batch 1) and ``llama-batched-bench -npp 512 -ntg 64 -npl 4`` (batch 4) on
each GGUF. Prints one row per (round, system), the load time and peak RSS of each qwenvl model
(loaded one after another), and the bytes a decode step streams.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from gemv import read_bandwidth  # bench/gemv.py

from qwenvl import kernels

SHAPES = [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)]  # qkv, o, gate_up, down


def _timer(fn, weights: list[torch.Tensor], x: torch.Tensor, arg):
    """A function timing one call of ``fn(x, w, arg)`` per weight, mean seconds per call."""

    def run() -> float:
        t = time.perf_counter()
        for w in weights:
            fn(x, w, arg)
        return (time.perf_counter() - t) / len(weights)

    return run


def gemv(ms: list[int], pool_mb: int = 256, reps: int = 5) -> None:
    bw = read_bandwidth()
    print(f"read bandwidth {bw:.1f} GB/s, {torch.get_num_threads()} threads")
    print(f"{'shape':>12} {'M':>3} {'int4 GB/s':>10} {'of bw':>6} {'us':>8} | {'int8t GB/s':>10} "
          f"{'of bw':>6} {'us':>8}")  # fmt: skip
    for n, k in SHAPES:
        nbytes4 = n * k // 2 + n * (k // 128) * 4
        count = max(8, pool_mb * 2**20 // nbytes4)
        packed = []
        for _ in range(count):
            q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
            s = torch.rand(n, k // 128) * 0.01
            packed.append(kernels.huge_page_copy(kernels.pack_int4(q, s, -8 * s)))
        count8 = max(8, pool_mb * 2**20 // (n * k))
        q8 = [
            kernels.huge_page_copy(
                kernels.tile_int8(torch.randint(-127, 127, (n, k)).to(torch.int8))
            )
            for _ in range(count8)
        ]
        sc = torch.rand(n)
        for m in ms:
            x = torch.randn(m, k)

            run4 = _timer(kernels.linear_int4, packed, x, n)
            run8 = _timer(kernels.linear_int8, q8, x, sc)
            run4(), run8()
            t4 = min(run4() for _ in range(reps))
            t8 = min(run8() for _ in range(reps))
            g4, g8 = nbytes4 / t4 / 1e9, n * k / t8 / 1e9
            int4 = f"{g4:>10.1f} {g4 / bw:>6.2f} {t4 * 1e6:>8.0f}"
            int8 = f"{g8:>10.1f} {g8 / bw:>6.2f} {t8 * 1e6:>8.0f}"
            print(f"{n:>6}x{k:<5} {m:>3} {int4} | {int8}")
        del packed, q8
        gc.collect()


# --- end-to-end decode -------------------------------------------------------------------------

CORPUS = (
    "the quick brown fox jumps over the lazy dog while seven red boxes sit on a table "
    "and a camera records the scene for a model that counts them one by one"
).split()


def qwenvl_load(ck: Path, mode: str):
    from qwenvl import LLM
    from qwenvl.engine.config import EngineConfig

    engine = EngineConfig(
        enable_prefix_caching=False, encoder_cache_memory=0, kv_cache_memory=1 << 30,
        max_num_seqs=16,
    )  # fmt: skip
    t = time.perf_counter()
    quant, _, head = mode.partition(":head-")
    llm = LLM(ck, engine_config=engine, quantization=quant, head_quantization=head or None)
    load_s = time.perf_counter() - t
    prompts = []
    for i in range(4):  # four different 512-token prompts, no shared prefix
        words = CORPUS[i:] + CORPUS[:i]
        p = llm.processor.prepare_text(" ".join(words * 40))
        prompts.append(
            dataclasses.replace(p, token_ids=p.token_ids[:512], positions=p.positions[:, :512])
        )
    return llm, prompts, load_s


def qwenvl_decode(llm, prompts, n: int = 64) -> float:
    from qwenvl import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    eng = llm.engine
    reqs = [eng.requests[eng.add_request(p, params)] for p in prompts]
    first = None
    while not all(r.finished for r in reqs):
        eng.step()
        if first is None and all(s.token_ids for r in reqs for s in r.sequences):
            first = time.perf_counter()
    end = time.perf_counter()
    for r in reqs:
        eng.pop_finished(r.request_id)
    return len(prompts) * (n - 1) / (end - first)


def llama_b1(bin_dir: Path, gguf: Path) -> float:
    out = subprocess.run(
        [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", "2", "-r", "1", "-o", "json",
         "-p", "0", "-n", "64", "-d", "512"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return float(json.loads(out)[0]["avg_ts"])


def llama_b4(bin_dir: Path, gguf: Path) -> float:
    out = subprocess.run(
        [str(bin_dir / "llama-batched-bench"), "-m", str(gguf), "-t", "2", "-c", "2368",
         "-b", "2048", "-ub", "512", "-npp", "512", "-ntg", "64", "-npl", "4"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    for line in (
        out.stdout + out.stderr
    ).splitlines():  # | PP | TG | B | N_KV | T_PP | S_PP | T_TG | S_TG |
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0] == "512" and cells[1] == "64" and cells[2] == "4":
            return float(cells[7])
    raise RuntimeError("no batch-4 row in llama-batched-bench output")


def decode(args) -> None:
    rows = []
    llms = {}
    for mode in args.modes:
        llms[mode] = qwenvl_load(args.ckpt, mode)
        print(f"# {mode}: loaded in {llms[mode][2]:.1f} s, peak RSS so far {_peak_gib():.2f} GiB")
    for llm, prompts, load_s in llms.values():
        qwenvl_decode(llm, prompts[:1], 8)  # warm up
        print(f"# loaded in {load_s:.1f} s; {_bytes_per_step(llm)}", flush=True)
    for r in range(args.rounds):
        for h, (llm, prompts, _) in llms.items():
            for b in (1, 4):
                rows.append((r, f"qwenvl {h}", b, qwenvl_decode(llm, prompts[:b])))
                print(rows[-1], flush=True)
        for g in args.gguf or []:
            rows.append((r, f"llama.cpp {g.stem}", 1, llama_b1(args.llama_bin, g)))
            print(rows[-1], flush=True)
            rows.append((r, f"llama.cpp {g.stem}", 4, llama_b4(args.llama_bin, g)))
            print(rows[-1], flush=True)
    print("\n| round | system | batch | tok/s |\n|---|---|---|---|")
    for r, name, b, v in rows:
        print(f"| {r} | {name} | {b} | {v:.2f} |")


def _peak_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _bytes_per_step(llm) -> str:
    from qwenvl.layers.int4_linear import Int4Linear
    from qwenvl.layers.packed_linear import PackedLinear

    dec = weights = head = 0
    for name, m in llm.model.named_modules():
        if "lm_head" in name and isinstance(m, Int4Linear):
            head = m.packed.numel()
        elif isinstance(m, Int4Linear):
            dec += m.packed.numel()
            weights += m.in_features * m.out_features
        elif isinstance(m, PackedLinear):
            t = m.qweight if m.mode == "int8" else m.weight
            if "lm_head" in name:
                head = t.numel() * t.element_size()
            else:
                dec += t.numel() * t.element_size() + (
                    m.scale.numel() * 4 if m.mode == "int8" else 0
                )
                weights += m.in_features * m.out_features
    return (f"decoder {dec / 1e6:.0f} MB for {weights / 1e9:.3f} G weights "
            f"({dec / weights:.4f} B/weight), head {head / 1e6:.0f} MB, "
            f"step {(dec + head) / 1e6:.0f} MB")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gemv")
    g.add_argument("--m", type=int, nargs="+", default=[1, 4])
    d = sub.add_parser("decode")
    d.add_argument("--ckpt", type=Path, required=True)
    d.add_argument("--llama-bin", type=Path)
    d.add_argument("--gguf", type=Path, nargs="*")
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument(
        "--modes",
        nargs="+",
        default=["int4", "int4:head-int8", "int8"],
        choices=["int4", "int4:head-int8", "int4:head-int4", "int8"],
    )
    args = p.parse_args()
    if not kernels.available():
        sys.exit(f"qwenvl kernels unavailable: {kernels.describe()}")
    gemv(args.m) if args.cmd == "gemv" else decode(args)


if __name__ == "__main__":
    main()
