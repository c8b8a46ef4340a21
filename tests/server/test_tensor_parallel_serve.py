"""``qwenvl serve`` split over processes, as users launch it: two ``torchrun`` invocations
standing in for two machines (``--nnodes 2 --node-rank 0|1``, rendezvous on 127.0.0.1), and
``--tensor-parallel-size 2`` starting its own worker. The truth is the same checkpoint at size 1
in this process; the openai client talks to the server. Ends: Ctrl-C (SIGINT) or torchrun's
SIGTERM stops every process; a killed worker fails requests with a 503 that says so and the
server stops by itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from processes import descendants, free_port, wait_gone, wait_ready
from qwenvl import LLM, SamplingParams

MESSAGES = [{"role": "user", "content": "Describe this image. Count the boxes."}]
LOGPROB_TOL = 1e-4


def wait_exit(proc: subprocess.Popen, pids: list[int], timeout: float = 30) -> int:
    code = proc.wait(timeout)
    assert wait_gone(pids, 10) == [], "processes left behind"
    return code


@contextmanager
def launched(*cmds: list[str]) -> Iterator[list[subprocess.Popen]]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen(c, env=env, start_new_session=True) for c in cmds]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def truth(folder: Path) -> Any:
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
    return LLM(folder, dtype="float32").chat(MESSAGES, params)[0].outputs[0]


def ask(port: int, **extra: Any) -> Any:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=MESSAGES,
        temperature=0,
        max_tokens=8,
        **extra,
    )


def assert_answers_as_size_one(port: int, want: Any) -> None:
    got = ask(port, logprobs=True, top_logprobs=2)
    assert got.choices[0].message.content == want.text
    lps = [t.logprob for t in got.choices[0].logprobs.content]
    ref = [lp[t] for lp, t in zip(want.logprobs, want.token_ids)]
    assert len(lps) == len(ref) and max(abs(a - b) for a, b in zip(lps, ref)) <= LOGPROB_TOL
    stream = ask(port, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text


def serve_args(folder: Path, port: int) -> list[str]:
    return ["serve", "--model", str(folder), "--dtype", "float32", "--port", str(port)]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_torchrun_nodes_serve_as_size_one(checkpoints):
    folder = checkpoints("qwen2_vl")
    port, master = free_port(), free_port()
    base = [shutil.which("torchrun"), "--nnodes", "2", "--nproc-per-node", "1"]
    base += ["--master-addr", "127.0.0.1", "--master-port", str(master)]
    tail = ["-m", "qwenvl", *serve_args(folder, port), "--tensor-parallel-size", "2"]
    nodes = [[*base, "--node-rank", str(r), *tail] for r in (0, 1)]
    want = truth(folder)
    with launched(*nodes) as procs:
        wait_ready(port, procs)
        assert_answers_as_size_one(port, want)
        below = [pid for p in procs for pid in descendants(p.pid)]
        procs[0].send_signal(signal.SIGTERM)  # torchrun passes it to rank 0, which stops rank 1
        wait_exit(procs[0], below)  # (torchrun's own exit code reports the signal)
        assert procs[1].wait(30) == 0


def test_ctrl_c_stops_the_server_and_its_workers(checkpoints):
    folder = checkpoints("qwen2_vl")
    port = free_port()
    cmd = [sys.executable, "-m", "qwenvl", *serve_args(folder, port)]
    with launched([*cmd, "--tensor-parallel-size", "2"]) as (proc,):
        wait_ready(port, [proc])
        assert_answers_as_size_one(port, truth(folder))
        workers = descendants(proc.pid)
        assert workers
        proc.send_signal(signal.SIGINT)
        assert wait_exit(proc, workers) == 0


def test_a_killed_worker_is_a_503_and_the_server_stops(checkpoints):
    folder = checkpoints("qwen2_vl")
    port = free_port()
    cmd = [sys.executable, "-m", "qwenvl", *serve_args(folder, port)]
    with launched([*cmd, "--tensor-parallel-size", "2"]) as (proc,):
        wait_ready(port, [proc])
        (worker,) = descendants(proc.pid)
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": str(folder), "messages": MESSAGES, "max_tokens": 4},
            timeout=30,
        )
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert "tensor-parallel worker is gone (rank 1 killed by SIGKILL)" in message
        assert wait_exit(proc, [worker], timeout=30) == 1
        assert time.monotonic() - start < 30
