"""Tensor parallelism on the CPU: memory per rank and batch-1 decode at tensor_parallel_size 1, 2.

    PYTHONPATH=src python bench/tensor_parallel.py                  # Qwen2-VL-2B shape, ~5 min
    PYTHONPATH=src python bench/tensor_parallel.py --shape small    # smoke run, ~1 min
    PYTHONPATH=src python bench/tensor_parallel.py --rounds 3 --json /tmp/tp.json

The checkpoint is bench/released_shapes.py's random-weight bf16 one (``--shape full``: the exact
Qwen2-VL-2B-Instruct shapes; ``small``: same structure, small widths), loaded with ``--dtype``
(default ``auto``: on the CPU bf16 packed decoder weights, float32 activations). The KV cache is a
fixed ``--kv-blocks`` blocks of 16 tokens at every size (the same tokens; each rank holds its own
KV heads of them), prefix and encoder caches off.

1. memory: ``LLM(path, tensor_parallel_size=N)`` for N = 1 and 2, each in a fresh subprocess of
   this script so the RSS figures are that size's alone: per rank (rank 0 = that process, ranks
   1.. = ``llm.workers.procs``) VmRSS and VmHWM (the peak) from /proc/<pid>/status after loading,
   and again after an 8-token decode; the load time; the bytes rank 0's ``llm.model`` holds
   (parameters + buffers, by part: decoder layers, embedding, LM head, vision tower, rest), the
   KV cache's bytes per rank; rank 1's weights are rank 0's minus the vision tower (same shards).
2. collectives: two processes joined as the engine joins its ranks (``engine.parallel.init_group``,
   gloo on the CPU, one thread each as the ranks get on two cores) time what one step sends:
   the all-reduce of a ``[1, hidden]`` float32 row (after every row-parallel layer, o_proj and
   down_proj: 2 per layer, plus one for the vocabulary-parallel embedding), the all-gather of the
   head's logits (``[1, vocab / 2]`` per rank), the broadcast of a decode step's ``StepInputs``
   (rank 0 to the workers, pickled), and the all-reduce of a ``[prompt, hidden]`` block (prefill);
   for scale, a round trip between two processes through a pipe and a spin on shared memory.
3. speed: both LLMs (tp=1 and tp=2) loaded at once in this process, then ``--rounds`` alternating
   rounds (tp1, tp2, tp1 without the fused decode step, in turn, each round): batch-1 greedy decode
   tok/s (``--tokens`` new tokens after a short text prompt, ``ignore_eos``, timed from the first
   token to the last as bench/cpu_speed.py's ``qwenvl_run``), and the time to first token of a
   ``--prompt-tokens`` text prompt and of an image + question (``--image-side``). Threads: tp=2
   ranks take cores / 2 each (the engine's ``Group.share_cpu``; it also sets rank 0's, i.e. this
   process's, torch threads), so the script sets torch's thread count before each run: all
   cores for tp=1, the ranks' share for tp=2.
   ``tp1 unfused`` is the tp=1 model with its one-call decode step (``kernels.decode_layers``)
   switched off, as every tp>1 step runs (module by module): it separates the loss of the fused
   step from the cost of the collectives and of one thread per rank (decode only: a prefill
   never fuses, so its TTFT is tp1's).

   Rank 0's collectives are also timed inside the engine (``torch.distributed``'s functions
   wrapped during the runs: calls and seconds, waits for the other ranks included), and each
   rank's CPU seconds are read from /proc.

Then: tok/s per round and tp2/tp1 within each round, TTFT per round, and where a tp=2 token's
time goes (the collectives of step 2 times their count per token, and rank 0's time inside
collectives in the engine, against the measured per-token time), plus the DRAM read bandwidth
bound (bytes of LM weights a token streams, summed over the ranks: the ranks of one machine share
its memory bandwidth). ``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from cpu_speed import best, cut, lm_bytes_per_token, qwenvl_run, read_bandwidth  # bench/
from released_shapes import CORPUS, FAMILIES, SHAPES, build_checkpoint, log  # bench/

MiB = 2**20
SIZES = (1, 2)
DECODE_PROMPT = "Write a short story about a robot who learns to paint landscapes at night."
BLOCK_SIZE = 16  # EngineConfig's default
TTFT_OF = ("tp1", "tp2")  # the unfused tp1 prefills exactly as tp1 (prefill never fuses)


def engine_config(kv_blocks: int):
    from qwenvl.engine.config import EngineConfig

    return EngineConfig(
        num_kv_blocks=kv_blocks,
        enable_prefix_caching=False,
        encoder_cache_memory=0,
        max_num_seqs=1,
    )


def load(path: Path, tp: int, dtype: str, kv_blocks: int):
    from qwenvl import LLM

    return LLM(path, dtype=dtype, tensor_parallel_size=tp, engine_config=engine_config(kv_blocks))


def long_prompt(llm, n: int):
    """A text prompt cut to its first n tokens."""
    return cut(llm.processor.prepare_text(" ".join(CORPUS) * 20), n)


def image_prompt(llm, side: int):
    """An image of side x side pixels and a question: the vision tower runs on rank 0 alone
    (on every core) and its features travel with the step to the other ranks."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    content = [
        {"type": "image", "image": Image.fromarray(pixels)},
        {"type": "text", "text": "Describe."},
    ]
    return llm.processor.prepare_chat([{"role": "user", "content": content}])


# --- /proc ----------------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rank_pids(llm) -> list[int]:
    return [os.getpid()] + [p.pid for p in (llm.workers.procs if llm.workers else [])]


def model_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of every parameter and buffer, each tensor once, by part of the model."""
    out = dict.fromkeys(("decoder", "embedding", "lm_head", "vision", "rest"), 0)
    seen: set[int] = set()
    for name, m in model.named_modules():
        own = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
        for _, t in own:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            if name.startswith("model.layers."):
                part = "decoder"
            elif name.startswith("model.embed_tokens"):
                part = "embedding"
            elif name.startswith("lm_head"):
                part = "lm_head"
            elif name.startswith("visual"):
                part = "vision"
            else:
                part = "rest"
            out[part] += t.numel() * t.element_size()
    return out


# --- 1. memory, in a fresh process per size ---------------------------------------------------
def memory_child(path: Path, tp: int, dtype: str, kv_blocks: int) -> dict[str, Any]:
    from qwenvl import SamplingParams

    result: dict[str, Any] = {"tp": tp, "before_load": proc_status(os.getpid())}
    t = time.perf_counter()
    llm = load(path, tp, dtype, kv_blocks)
    try:
        result["load_s"] = time.perf_counter() - t
        pids = rank_pids(llm)
        result["pids"] = pids
        result["after_load"] = [proc_status(p) for p in pids]
        result["weight_format"] = llm.weight_format
        result["rank0_weights"] = model_bytes(llm.model)
        result["kv_bytes_per_rank"] = llm.engine.kv.nbytes
        result["kv_blocks"] = llm.engine.kv.num_blocks
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        llm.generate(DECODE_PROMPT, params)
        result["after_decode"] = [proc_status(p) for p in pids]
    finally:
        llm.shutdown()
    return result


def run_child(flag: str, *extra: str) -> dict[str, Any]:
    """This script in a subprocess; its last ``RESULT {json}`` line."""
    cmd = [sys.executable, __file__, flag, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"subprocess {' '.join(cmd[2:])} failed (exit {proc.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


def report_memory(mem: dict[int, dict[str, Any]]) -> None:
    log("\n== memory per rank (MiB; a fresh process per size) ==")
    rows = [("tp", "rank", "load s", "RSS before load", "RSS after load", "peak (VmHWM)",
             "RSS after decode", "peak after decode", "KV cache")]  # fmt: skip
    for tp, r in mem.items():
        for rank, (a, d) in enumerate(zip(r["after_load"], r["after_decode"])):
            rows.append((
                str(tp), str(rank), f"{r['load_s']:.1f}" if rank == 0 else "",
                f"{r['before_load']['VmRSS'] / MiB:.0f}" if rank == 0 else "-",
                f"{a['VmRSS'] / MiB:.0f}", f"{a['VmHWM'] / MiB:.0f}",
                f"{d['VmRSS'] / MiB:.0f}", f"{d['VmHWM'] / MiB:.0f}",
                f"{r['kv_bytes_per_rank'] / MiB:.1f}",
            ))  # fmt: skip
        total = sum(a["VmRSS"] for a in r["after_load"]) / MiB
        peak = sum(a["VmHWM"] for a in r["after_decode"]) / MiB
        rows.append((str(tp), "sum", "", "", f"{total:.0f}", "", "", f"{peak:.0f}", ""))
    table(rows)
    log("\n== weights held (MiB, parameters + buffers; rank 1 = rank 0 minus the vision tower) ==")
    parts = ("decoder", "embedding", "lm_head", "vision", "rest")
    rows = [("tp", "format", *parts, "rank 0 total", "decoder share", "rank 1 (derived)")]
    for tp, r in mem.items():
        w = r["rank0_weights"]
        total = sum(w.values())
        rows.append((
            str(tp), str(r["weight_format"]), *(f"{w[p] / MiB:.1f}" for p in parts),
            f"{total / MiB:.1f}", f"{100 * w['decoder'] / total:.0f}%",
            f"{(total - w['vision']) / MiB:.1f}" if tp > 1 else "-",
        ))  # fmt: skip
    table(rows)
    if 1 in mem and 2 in mem:
        w1, w2 = mem[1]["rank0_weights"], mem[2]["rank0_weights"]
        vocab1, vocab2 = w1["embedding"] + w1["lm_head"], w2["embedding"] + w2["lm_head"]
        log(f"tp=2 rank 0 holds {100 * sum(w2.values()) / sum(w1.values()):.0f}% of tp=1's "
            f"weight bytes (its decoder {100 * w2['decoder'] / w1['decoder']:.0f}%, "
            f"embedding + head {100 * vocab2 / max(1, vocab1):.0f}%)")  # fmt: skip


# --- 2. collectives between two ranks ---------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comm_child(rank: int, init: str, spec: dict[str, Any], prompt: int, iters: int) -> dict:
    """One of two ranks: mean seconds per collective, best of 3 batches of ``iters``."""
    import torch.distributed as dist

    from qwenvl.engine import parallel
    from qwenvl.engine.model_runner import StepInputs
    from qwenvl.layers.parallel import VocabShard

    size = 2
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores // size))  # as Group.share_cpu gives the ranks
    group = parallel.init_group(rank, size, "cpu", init, (rank, size))
    hidden = spec["hidden"]
    shard = VocabShard.of(spec.get("vocab", 151936), rank, size)
    row = torch.randn(1, hidden)
    block = torch.randn(prompt, hidden)
    logits = torch.randn(1, shard.per_rank)
    parts = logits.new_empty(size, shard.per_rank)
    ctx = 64  # a decode step of a 64-token context: one block-table row of 4 blocks
    step = StepInputs(
        ids=torch.tensor([1234]),
        positions=torch.full((3, 1), ctx - 1, dtype=torch.long),
        layout=[(list(range(math.ceil(ctx / BLOCK_SIZE))), ctx - 1, 1)],
        rows=[0],
        vision_rows=None,
        vision=None,
    )

    def loop(fn, n):
        def run():
            for _ in range(n):
                fn()

        return run

    ops = {
        "all_reduce_row": (lambda: dist.all_reduce(row), iters),
        "all_gather_logits": (lambda: dist.all_gather_single(parts, logits), iters),
        "broadcast_step": (lambda: group.broadcast(step if rank == 0 else None), iters),
        "all_reduce_prompt": (lambda: dist.all_reduce(block), max(4, iters // 20)),
    }
    out = {}
    for name, (fn, n) in ops.items():
        loop(fn, max(2, n // 10))()  # warm-up
        out[name] = best(loop(fn, n), 3) / n
    dist.barrier()
    dist.destroy_process_group()
    out["shapes"] = {
        "all_reduce_row": [1, hidden],
        "all_gather_logits": [1, shard.per_rank],
        "all_reduce_prompt": [prompt, hidden],
    }
    out["threads"] = torch.get_num_threads()
    return out


def _echo_pipe(conn) -> None:
    while (m := conn.recv()) is not None:
        conn.send(m)


def _echo_shared(flags, n: int) -> None:
    for i in range(1, n + 1):
        while flags[0] != i:
            pass
        flags[1] = i


def ipc_floor(n: int = 2000) -> dict[str, float]:
    """Seconds of a round trip between two processes through a pipe and through a spin on
    shared memory (Python on both sides): what this machine allows, against gloo's figures."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_echo_pipe, args=(b,))
    p.start()
    for _ in range(50):
        a.send(1), a.recv()
    t = time.perf_counter()
    for _ in range(n):
        a.send(1), a.recv()
    pipe = (time.perf_counter() - t) / n
    a.send(None)
    p.join()
    flags = ctx.Array("q", 2, lock=False)
    p = ctx.Process(target=_echo_shared, args=(flags, n))
    p.start()
    t = time.perf_counter()
    for i in range(1, n + 1):
        flags[0] = i
        while flags[1] != i:
            pass
    shared = (time.perf_counter() - t) / n
    p.join()
    return {"pipe_round_trip": pipe, "shared_memory_round_trip": shared}


def run_comm(spec_name: str, family: str, prompt: int, iters: int) -> dict[str, Any]:
    init = f"tcp://127.0.0.1:{free_port()}"
    extra = [family, spec_name, str(prompt), str(iters), init]
    cmd = [sys.executable, __file__, "--comm-child"]
    peer = subprocess.Popen([*cmd, "1", *extra], stdout=subprocess.DEVNULL)
    try:
        result = run_child("--comm-child", "0", *extra)
        peer.wait(60)
        return result
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()


# --- 3. speed, both sizes in memory, alternating rounds ----------------------------------------
COLLECTIVES = ("all_reduce", "all_gather_single", "broadcast_object_list")


@contextlib.contextmanager
def timed_collectives(acc: dict[str, list[float]]):
    """Count the calls and seconds of this process's collectives (rank 0's: its waits for the
    other ranks included) into ``acc``: name -> [calls, seconds]. The model's hooks and the
    step broadcast look the functions up on ``torch.distributed`` at each call."""
    import torch.distributed as dist

    saved = {n: getattr(dist, n) for n in COLLECTIVES}

    def wrap(name, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                entry = acc.setdefault(name, [0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - t

        return timed

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield acc
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


@contextlib.contextmanager
def unfused(llm):
    """The tp=1 engine without its one-call decode step (as tp>1 runs every step)."""
    backend = llm.engine.runner.backend
    saved = getattr(backend, "params", None)
    backend.params = None
    try:
        yield
    finally:
        backend.params = saved


def run_speed(path: Path, args, bytes_note: dict[str, Any]) -> dict[str, Any]:
    threads_all = torch.get_num_threads()
    t = time.perf_counter()
    llm1 = load(path, 1, args.dtype, args.kv_blocks)
    log(f"tp=1 loaded in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    llm2 = load(path, 2, args.dtype, args.kv_blocks)
    threads_rank = torch.get_num_threads()  # what Group.share_cpu gave rank 0 (and each rank)
    log(f"tp=2 loaded in {time.perf_counter() - t:.1f} s (rank 0 then runs {threads_rank} "
        f"threads; tp=1 runs {threads_all})")  # fmt: skip
    out: dict[str, Any] = {"threads_tp1": threads_all, "threads_tp2_per_rank": threads_rank}
    try:
        fusable = getattr(llm1.engine.runner.backend, "params", None) is not None
        out["tp1_fused_step"] = fusable
        short = llm1.processor.prepare_text(DECODE_PROMPT)
        long = long_prompt(llm1, args.prompt_tokens)
        picture = image_prompt(llm1, args.image_side)
        out["image_prompt_tokens"] = len(picture.token_ids)
        out["decode_prompt_tokens"] = len(short.token_ids)
        out["ttft_prompt_tokens"] = len(long.token_ids)
        entries: dict[str, tuple[Any, int, Any]] = {
            "tp1": (llm1, threads_all, contextlib.nullcontext),
            "tp2": (llm2, threads_rank, contextlib.nullcontext),
        }
        if fusable and not args.no_unfused:
            entries["tp1 unfused"] = (llm1, threads_all, lambda: unfused(llm1))
        workers = rank_pids(llm2)[1:]
        bytes_note["tp1"] = lm_bytes_per_token(llm1)
        bytes_note["tp2_rank0"] = lm_bytes_per_token(llm2)

        def one(label: str, n: int, prompt) -> dict[str, Any]:
            llm, threads, ctx = entries[label]
            torch.set_num_threads(threads)
            cpu0 = time.process_time()
            cpuw = [cpu_seconds(p) for p in workers]
            calls: dict[str, list[float]] = {}
            with ctx(), timed_collectives(calls):
                r = qwenvl_run(llm, [prompt], n)
            r["cpu_rank0_s"] = time.process_time() - cpu0
            r["cpu_workers_s"] = [cpu_seconds(p) - c for p, c in zip(workers, cpuw)]
            r["tokens"] = r["tokens"][0]
            r["collectives"] = calls
            return r

        log("warm-up ...")
        for label in entries:
            one(label, 8, short)
            if label in TTFT_OF:
                one(label, 1, long)
        rounds = []
        for i in range(args.rounds):
            log(f"round {i + 1}/{args.rounds}")
            rnd: dict[str, Any] = {}
            for label in entries:
                d = one(label, args.tokens, short)
                rate = (args.tokens - 1) / d["decode_s"]
                f = one(label, 1, long) if label in TTFT_OF else {"ttft": None}
                v = one(label, 1, picture) if label in TTFT_OF else {"ttft": None}
                rnd[label] = {
                    "image_ttft_s": v["ttft"],
                    "decode_tok_s": rate,
                    "decode_s": d["decode_s"],
                    "decode_wall_s": d["total_s"],
                    "cpu_rank0_s": d["cpu_rank0_s"],
                    "cpu_workers_s": d["cpu_workers_s"],
                    "ttft_s": f["ttft"],
                    "tokens": d["tokens"],
                    # rank 0 inside collectives over the whole run (prefill step included)
                    "collectives_decode_run": d["collectives"],
                }
                log(f"  {label:>11}: decode {rate:7.2f} tok/s ({args.tokens} tokens, "
                    f"{1e3 / rate:.1f} ms/token; CPU s rank 0 {d['cpu_rank0_s']:.2f}, workers "
                    f"{', '.join(f'{c:.2f}' for c in d['cpu_workers_s'])} over "
                    f"{d['total_s']:.2f} s)" + ("" if f["ttft"] is None else
                    f"; TTFT {len(long.token_ids)}-token prompt {f['ttft']:.3f} s, image + "
                    f"question ({len(picture.token_ids)} tokens) {v['ttft']:.2f} s"))  # fmt: skip
            rnd["load_average"] = os.getloadavg()[0]
            log(f"  load average {rnd['load_average']:.2f} (other work on the machine skews this)")
            rnd["ratio_tp2_tp1"] = rnd["tp2"]["decode_tok_s"] / rnd["tp1"]["decode_tok_s"]
            rnd["ttft_ratio_tp2_tp1"] = rnd["tp2"]["ttft_s"] / rnd["tp1"]["ttft_s"]
            rnd["image_ttft_ratio_tp2_tp1"] = (
                rnd["tp2"]["image_ttft_s"] / rnd["tp1"]["image_ttft_s"]
            )
            rounds.append(rnd)
        out["rounds"] = rounds
        out["decode_tokens"] = args.tokens
        out["greedy_tokens_identical"] = all(
            r["tp1"]["tokens"] == r["tp2"]["tokens"] for r in rounds
        )
    finally:
        llm2.shutdown()
        torch.set_num_threads(threads_all)
    return out


# --- report -----------------------------------------------------------------------------------
def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        log(" | ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            log("-+-".join("-" * w for w in widths))


def report_speed(speed: dict[str, Any], comm: dict[str, Any] | None, spec, bw, nbytes) -> dict:
    rounds = speed["rounds"]
    labels = [k for k in rounds[0] if isinstance(rounds[0][k], dict)]
    log(f"\n== batch-1 decode (tok/s) and TTFT of a {speed['ttft_prompt_tokens']}-token prompt "
        f"(s), alternating rounds, both sizes loaded at once ==")  # fmt: skip
    head = ("round", *(f"{lb} tok/s" for lb in labels), "tp2/tp1",
            *(f"{lb} TTFT" for lb in TTFT_OF), "TTFT tp2/tp1")  # fmt: skip
    rows = [head]
    for i, r in enumerate(rounds, 1):
        rows.append((
            str(i), *(f"{r[lb]['decode_tok_s']:.2f}" for lb in labels),
            f"{r['ratio_tp2_tp1']:.2f}x", *(f"{r[lb]['ttft_s']:.3f}" for lb in TTFT_OF),
            f"{r['ttft_ratio_tp2_tp1']:.2f}x",
        ))  # fmt: skip
    table(rows)
    med = {lb: statistics.median(r[lb]["decode_tok_s"] for r in rounds) for lb in labels}
    ttft = {lb: statistics.median(r[lb]["ttft_s"] for r in rounds) for lb in TTFT_OF}
    image = {lb: statistics.median(r[lb]["image_ttft_s"] for r in rounds) for lb in TTFT_OF}
    summary: dict[str, Any] = {
        "median_tok_s": med,
        "median_ttft_s": ttft,
        "median_image_ttft_s": image,
    }
    log("median over rounds: " + ", ".join(f"{lb} {med[lb]:.2f} tok/s" for lb in labels)
        + f"; tp2/tp1 {med['tp2'] / med['tp1']:.2f}x; TTFT tp2/tp1 "
        f"{ttft['tp2'] / ttft['tp1']:.2f}x; greedy tokens tp1 == tp2: "
        f"{'yes' if speed['greedy_tokens_identical'] else 'no'}")  # fmt: skip
    log(f"image + question ({speed['image_prompt_tokens']} tokens; the vision tower on rank 0 "
        f"with every core, its features sent with the step): first token tp1 {image['tp1']:.2f} s, "
        f"tp2 {image['tp2']:.2f} s ({image['tp2'] / image['tp1']:.2f}x)")  # fmt: skip
    if bw:
        b1, b2 = nbytes["tp1"], 2 * nbytes["tp2_rank0"]
        summary["bound_tok_s"] = {"tp1": bw / b1, "tp2": bw / b2}
        log(f"DRAM read bound ({bw / 1e9:.1f} GB/s): tp1 streams {b1 / 1e6:.0f} MB of LM "
            f"weights a token -> {bw / b1:.1f} tok/s; tp2 {nbytes['tp2_rank0'] / 1e6:.0f} MB "
            f"per rank, {b2 / 1e6:.0f} MB over both (one machine's bandwidth) -> "
            f"{bw / b2:.1f} tok/s")  # fmt: skip
    if comm:
        layers = spec["layers"]
        per_token = {
            "all_reduce_row": 2 * layers + 1,  # o_proj + down_proj per layer, the embedding
            "all_gather_logits": 1,
            "broadcast_step": 1,
        }
        ms = 1e3 / med["tp2"]
        comm_ms = sum(comm[k] * n for k, n in per_token.items()) * 1e3
        summary["tp2_ms_per_token"] = ms
        summary["tp2_collectives_ms_per_token"] = comm_ms
        log(f"\n== where a tp=2 decode token's {ms:.1f} ms go (collectives timed alone between two "
            f"processes, gloo, {comm['threads']} thread each) ==")  # fmt: skip
        rows = [("collective", "shape", "us each", "per token", "ms per token", "of the token")]
        for k, n in per_token.items():
            shape = "x".join(map(str, comm["shapes"].get(k, ["StepInputs"])))
            each_ms = comm[k] * n * 1e3
            rows.append((k, shape, f"{comm[k] * 1e6:.0f}", str(n), f"{each_ms:.2f}",
                         f"{100 * each_ms / ms:.0f}%"))  # fmt: skip
        rows.append(("sum", "", "", "", f"{comm_ms:.2f}", f"{100 * comm_ms / ms:.0f}%"))
        table(rows)
        floor = comm.get("floor")
        if floor:
            row = comm["all_reduce_row"]
            log(f"one all-reduce of a row takes {row / floor['pipe_round_trip']:.0f}x a pipe "
                f"round trip between two processes and "
                f"{row / floor['shared_memory_round_trip']:.0f}x a spin on shared "
                "memory")  # fmt: skip
        seen = [r["tp2"]["collectives_decode_run"] for r in rounds]
        if seen and seen[0]:
            tokens = speed["decode_tokens"]
            inside = statistics.median(sum(v[1] for v in c.values()) for c in seen) * 1e3 / tokens
            calls = sum(v[0] for v in seen[0].values()) / tokens
            summary["tp2_rank0_in_collectives_ms_per_token"] = inside
            log(f"in the engine (median round), rank 0 spent {inside:.1f} ms a token inside "
                f"{calls:.0f} collectives ({100 * inside / ms:.0f}% of the token; waits for "
                "rank 1 included): "
                + ", ".join(f"{k} {v[0]} calls {v[1] * 1e3:.0f} ms" for k, v in seen[0].items())
                + f" over the {tokens}-token run (round 1)")  # fmt: skip
        rest = ms - comm_ms
        note = (f"the rest, {rest:.1f} ms, is each rank's share of the weights on "
                f"{speed['threads_tp2_per_rank']} thread(s), module by module")  # fmt: skip
        if "tp1 unfused" in med:
            note += (f"; tp=1 takes {1e3 / med['tp1']:.1f} ms a token with its fused decode "
                     f"step and {1e3 / med['tp1 unfused']:.1f} ms without it (tp>1 never "
                     "fuses)")  # fmt: skip
        log(note)
        pre = comm["all_reduce_prompt"] * (2 * layers + 1) * 1e3
        summary["tp2_prefill_collectives_ms"] = pre
        log(f"prefill of {speed['ttft_prompt_tokens']} tokens: {2 * layers + 1} all-reduces of "
            f"[{speed['ttft_prompt_tokens']}, {spec['hidden']}] = {pre:.1f} ms of a tp=2 TTFT of "
            f"{ttft['tp2'] * 1e3:.0f} ms")  # fmt: skip
    return summary


# --- main -------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    tmp = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    ap.add_argument("--cache", type=Path, default=tmp / "qwenvl-bench")
    ap.add_argument("--family", choices=FAMILIES, default="qwen2_vl")
    ap.add_argument("--shape", choices=("full", "small"), default="full")
    ap.add_argument("--dtype", default="auto", help="LLM(dtype=...); auto = bf16 weights, fp32 "
                    "activations on the CPU")  # fmt: skip
    ap.add_argument("--kv-blocks", type=int, default=64, help="KV blocks of 16 tokens, every size")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode run")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="TTFT prompt length")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--image-side", type=int, default=448, help="image prompt: side in pixels")
    ap.add_argument("--comm-iters", type=int, default=400)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--no-unfused", action="store_true", help="skip the tp1-unfused runs")
    ap.add_argument("--json", type=Path, default=None, help="write every number to this file")
    ap.add_argument("--memory-child", nargs=4, metavar=("PATH", "TP", "DTYPE", "KV"),
                    help=argparse.SUPPRESS)  # fmt: skip
    ap.add_argument("--comm-child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        p, tp, dtype, kv = args.memory_child
        print("RESULT " + json.dumps(memory_child(Path(p), int(tp), dtype, int(kv))), flush=True)
        return
    if args.comm_child:
        rank, family, shape, prompt, iters, init = args.comm_child
        r = comm_child(int(rank), init, SHAPES[shape][family], int(prompt), int(iters))
        if rank == "0":
            print("RESULT " + json.dumps(r), flush=True)
        return
    if args.tokens < 2:
        ap.error("--tokens must be at least 2")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    need = math.ceil((max(args.prompt_tokens, 32) + args.tokens + 1) / BLOCK_SIZE)
    if args.kv_blocks < need:
        ap.error(f"--kv-blocks {args.kv_blocks}: a run needs {need} blocks")

    spec = SHAPES[args.shape][args.family]
    t_start = time.perf_counter()
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{len(os.sched_getaffinity(0))} cores, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.2f}; "
        f"{args.family} shape {args.shape}, dtype {args.dtype}, KV {args.kv_blocks} blocks of "
        f"{BLOCK_SIZE} tokens")  # fmt: skip
    path = build_checkpoint(args.cache, args.family, args.shape)
    report: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                     if not k.endswith("_child")},
        "torch": torch.__version__,
        "cores": len(os.sched_getaffinity(0)),
        "checkpoint": str(path),
        "load_average_start": os.getloadavg()[0],
        "speed_setup": "both LLMs (tp=1, tp=2) loaded at once in one process; rounds alternate",
    }  # fmt: skip

    if not args.skip_memory:
        log("# memory: each size in a fresh subprocess ...")
        mem = {}
        for tp in SIZES:
            mem[tp] = run_child("--memory-child", str(path), str(tp), args.dtype,
                                str(args.kv_blocks))  # fmt: skip
            log(f"  tp={tp}: loaded in {mem[tp]['load_s']:.1f} s")
        report["memory"] = mem
        report_memory(mem)

    log("\n# collectives between two gloo ranks ...")
    comm = run_comm(args.shape, args.family, args.prompt_tokens, args.comm_iters)
    report["collectives_s"] = comm
    log("  " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in comm.items()
                         if isinstance(v, float)))  # fmt: skip
    comm["floor"] = ipc_floor()
    log(f"  for scale, a round trip between two processes: pipe "
        f"{comm['floor']['pipe_round_trip'] * 1e6:.0f} us, spin on shared memory "
        f"{comm['floor']['shared_memory_round_trip'] * 1e6:.1f} us")  # fmt: skip

    bw = read_bandwidth(3)
    report["dram_read_GBps"] = bw / 1e9
    log(f"DRAM read bandwidth {bw / 1e9:.1f} GB/s")
    log("\n# decode and TTFT, both sizes loaded ...")
    nbytes: dict[str, int] = {}
    speed = run_speed(path, args, nbytes)
    report["speed"] = speed
    report["lm_bytes_per_token"] = nbytes
    report["summary"] = report_speed(speed, comm, spec, bw, nbytes)
    report["wall_s"] = time.perf_counter() - t_start
    log(f"\ntotal {report['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
