"""Load test of ``qwenvl serve`` on loopback: concurrent clients, distinct images, streams and
aborts; reports failures, throughput vs sequential, time to first token and server RSS.

    python bench/serve_load.py                       # builds a tiny random checkpoint first
    python bench/serve_load.py --model DIR --requests 400 --clients 16

The server runs as a subprocess bound to 127.0.0.1; the script never talks to another host and
stops issuing requests after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHOWN_METRICS = (
    "qwenvl_aborted",
    "qwenvl_engine_encoder_cache",
    "qwenvl_requests_total",
    "qwenvl_engine_free_blocks",
    "qwenvl_engine_num_blocks",
)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_image(rng: random.Random) -> str:
    w, h = rng.randint(48, 160), rng.randint(48, 160)
    a = np.random.default_rng(rng.getrandbits(32)).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wait_up(base: str, proc: subprocess.Popen, log: Path) -> None:
    """Wait for the server subprocess to answer /health (its log's tail if it never does)."""
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() - t0 > 120:
            print(log.read_text()[-3000:])
            raise SystemExit("the server did not start")
        time.sleep(0.2)


def build_tiny(folder: Path) -> Path:
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    import tiny  # type: ignore[import-not-found]

    return tiny.build_checkpoint(folder / "tiny", "qwen2_vl")


class Result:
    def __init__(self) -> None:
        self.ok = 0
        self.aborted = 0
        self.failed: list[str] = []
        self.ttft: list[float] = []
        self.latency: list[float] = []

    def merge(self, other: Result) -> None:
        self.ok += other.ok
        self.aborted += other.aborted
        self.failed += other.failed
        self.ttft += other.ttft
        self.latency += other.latency


async def one_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], abort: bool, res: Result
) -> None:
    t0 = time.perf_counter()
    try:
        if not body.get("stream"):
            r = await client.post(url, json=body)
            if r.status_code != 200:
                res.failed.append(f"{r.status_code} {r.text[:200]}")
                return
            r.json()["choices"][0]["message"]
            res.ok += 1
            res.latency.append(time.perf_counter() - t0)
            return
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.failed.append(f"{r.status_code} {(await r.aread())[:200]!r}")
                return
            chunks = 0
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                data = json.loads(line[6:])
                if "error" in data:
                    res.failed.append(f"stream error {data['error']['message'][:200]}")
                    return
                if chunks == 1:  # the role chunk comes first; this is the first token
                    res.ttft.append(time.perf_counter() - t0)
                chunks += 1
                if abort and chunks >= 3:
                    res.aborted += 1
                    return  # leaving the block closes the connection mid-stream
            if not done:
                res.failed.append("stream ended without [DONE]")
                return
            res.ok += 1
            res.latency.append(time.perf_counter() - t0)
    except Exception as e:  # a failed request, reported with its kind
        res.failed.append(f"{type(e).__name__}: {e}")


async def run_load(
    base: str,
    model: str,
    n_requests: int,
    n_clients: int,
    max_tokens: int,
    seed: int,
    deadline: float,
    on_progress: Any = None,
) -> tuple[Result, float, int]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n_requests):
        stream = rng.random() < 0.5
        abort = stream and rng.random() < 0.25
        body = {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": random_image(rng)}},
                        {"type": "text", "text": f"Describe image {i}."},
                    ],
                }
            ],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "ignore_eos": True,
            "stream": stream,
        }
        jobs.append((body, abort))
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    res = Result()
    issued = 0
    url = f"{base}/v1/chat/completions"

    async def worker() -> None:
        nonlocal issued
        async with httpx.AsyncClient(timeout=120) as client:
            while not queue.empty() and time.monotonic() < deadline:
                body, abort = queue.get_nowait()
                issued += 1
                await one_request(client, url, body, abort, res)
                if on_progress is not None:
                    on_progress(issued)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(n_clients)))
    return res, time.perf_counter() - t0, issued


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: build a tiny random one)")
    ap.add_argument("--requests", type=int, default=400, help="requests per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --requests on one server")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--sequential", type=int, default=40, help="requests of the 1-client baseline")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-seconds", type=float, default=900)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-args", default="", help="extra `qwenvl serve` arguments, quoted")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny(Path(tmp)))
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        cmd = [
            sys.executable, "-m", "qwenvl", "serve", "--model", model, "--port", str(port),
            "--served-model-name", "bench", "--dtype", "float32",
            "--max-waiting-requests", "1000", *args.server_args.split(),
        ]  # fmt: skip
        log = open(Path(tmp) / "server.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_up(base, proc, Path(tmp) / "server.log")
            deadline = time.monotonic() + args.max_seconds
            # warm-up, then the sequential baseline (1 client)
            asyncio.run(run_load(base, "bench", 16, 4, args.max_tokens, 99, deadline))
            rss_before = rss_mib(proc.pid)
            seq, seq_s, seq_n = asyncio.run(
                run_load(base, "bench", args.sequential, 1, args.max_tokens, 1, deadline)
            )
            samples: list[tuple[int, float]] = []
            settled: list[float] = []
            res, load_s, issued = Result(), 0.0, 0
            for r in range(args.rounds):  # same load again: settled RSS must not trend up

                def progress(k: int, r: int = r) -> None:
                    k += r * args.requests
                    if k % 50 == 0 and all(k != done for done, _ in samples):
                        samples.append((k, rss_mib(proc.pid)))

                part, part_s, part_n = asyncio.run(
                    run_load(
                        base, "bench", args.requests, args.clients, args.max_tokens,
                        args.seed + r, deadline, progress,
                    )
                )  # fmt: skip
                res.merge(part)
                load_s += part_s
                issued += part_n
                time.sleep(6.0)  # let the load settle (the server trims its heap every 5 s)
                settled.append(rss_mib(proc.pid))
            rss_after = settled[-1]
            metrics = httpx.get(f"{base}/metrics").text
            health = httpx.get(f"{base}/health").status_code
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()

    seq_tput = seq_n / seq_s
    tput = issued / load_s
    print(f"model: {'tiny random qwen2_vl' if not args.model else args.model}, "
          f"cpu threads: {os.cpu_count()}, max_tokens={args.max_tokens}")  # fmt: skip
    print(f"sequential: {seq_n} requests in {seq_s:.1f} s = {seq_tput:.2f} req/s "
          f"(failed {len(seq.failed)})")  # fmt: skip
    print(f"load: {args.rounds} x {args.requests} requests from {args.clients} clients: "
          f"{issued} in {load_s:.1f} s = "
          f"{tput:.2f} req/s ({tput / seq_tput:.2f}x sequential)")  # fmt: skip
    print(f"  completed {res.ok}, aborted mid-stream on purpose {res.aborted}, "
          f"FAILED {len(res.failed)}")  # fmt: skip
    for f in res.failed[:10]:
        print("   ", f)
    print(f"  TTFT (streamed) p50 {pct(res.ttft, 50) * 1000:.0f} ms, "
          f"p95 {pct(res.ttft, 95) * 1000:.0f} ms over {len(res.ttft)}")  # fmt: skip
    print(f"  latency p50 {pct(res.latency, 50) * 1000:.0f} ms, "
          f"p95 {pct(res.latency, 95) * 1000:.0f} ms")  # fmt: skip
    growth = (rss_after - rss_before) / rss_before * 100
    print(f"server RSS: {rss_before:.0f} MiB before, {rss_after:.0f} MiB after ({growth:+.1f}%); "
          "settled after each round: " + ", ".join(f"{v:.0f}" for v in settled) +
          "; under load: " + ", ".join(f"{k}:{v:.0f}" for k, v in samples[::4]))  # fmt: skip
    print(f"health after: {health}")
    for line in metrics.splitlines():
        if line.startswith(SHOWN_METRICS):
            print("  " + line)
    return 0 if not res.failed and not seq.failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
