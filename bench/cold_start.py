"""Cold start to the first token, with and without the built-weights cache, in alternating rounds.

    python bench/cold_start.py                       # the exact Qwen2-VL-2B shape (random weights)
    python bench/cold_start.py --model DIR --rounds 3

Each run is a fresh process (files already in the page cache: a first untimed run reads them):
import qwenvl, ``LLM(model)`` (on the CPU a 16-bit checkpoint this size is packed in bf16 for the
kernels), then one greedy token of a short chat turn, then ``--decode`` more tokens for the decode
rate. ``repack``: ``QWENVL_WEIGHT_CACHE=0``, every start packs the checkpoint again (what every
start did before the cache); ``cached``: a warm cache, the start maps the built weights. The load
average is printed around each run, as the box may be shared.
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

sys.path.insert(0, str(Path(__file__).parent))

SHORT_PROMPT = "Hello, who are you?"  # llama_cpp.py's cold row asks llama-mtmd-cli the same

# One chat turn through the chat template, as llama-mtmd-cli's is (the import, the template and
# the tokenizer all count).
CODE = """
import json, sys, time
t0 = time.perf_counter()
from qwenvl import LLM, SamplingParams
t1 = time.perf_counter()
llm = LLM(sys.argv[1])
t2 = time.perf_counter()
chat = [{"role": "user", "content": sys.argv[3]}]
first = llm.chat(chat, SamplingParams(temperature=0, max_tokens=1))[0]
t3 = time.perf_counter()
n = int(sys.argv[2])
out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True))
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_token": t3 - t2,
                  "decode_s": t4 - t3, "decode_tok_s": n / (t4 - t3 - (t3 - t2)),
                  "prompt_tokens": first.num_prompt_tokens}))
"""


def run(model: Path, env: dict[str, str], decode: int) -> dict:
    # Python's default: an installed package's bytecode is compiled once (the untimed first start
    # writes it), not compiled again at every start as under PYTHONDONTWRITEBYTECODE.
    env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    t0 = time.perf_counter()
    argv = [sys.executable, "-c", CODE, str(model), str(decode), SHORT_PROMPT]
    out = subprocess.run(argv, env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    wall = time.perf_counter() - t0
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {**row, "to_first_token": wall - row["decode_s"]}  # process start to first token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: 2B shape, random)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode", type=int, default=16, help="tokens timed for the decode rate")
    a = ap.parse_args()
    model = a.model
    if model is None:
        from released_shapes import build_checkpoint

        model = build_checkpoint(Path(tempfile.gettempdir()) / "qwenvl-bench", "qwen2_vl", "full")
    cache = Path(tempfile.mkdtemp(prefix="qwenvl-weight-cache-"))
    base = {**os.environ, "QWENVL_CACHE_DIR": str(cache)}
    modes = {"repack": {**base, "QWENVL_WEIGHT_CACHE": "0"}, "cached": base}
    print("warming the page cache and writing the weight cache (untimed)", flush=True)
    first = run(model, base, 1)
    print(f"  first start, cache written: load {first['load']:.1f} s", flush=True)
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(a.rounds):
        for mode, env in modes.items():
            before = os.getloadavg()[0]
            row = run(model, env, a.decode)
            row["load_avg"] = (before, os.getloadavg()[0])
            rows[mode].append(row)
            print(f"round {r + 1} {mode:7s} import {row['import']:.1f} s  load {row['load']:.1f}"
                  f" s  first token {row['first_token']:.2f} s  process start to first token "
                  f"{row['to_first_token']:.2f} s  decode {row['decode_tok_s']:.2f} tok/s  load "
                  f"avg {before:.1f}->{row['load_avg'][1]:.1f}", flush=True)  # fmt: skip
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    print(f"cache folder {cache}: {size / 2**30:.2f} GiB")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
