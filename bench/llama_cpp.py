"""qwenvl beside llama.cpp on the exact Qwen2-VL-2B or Qwen2.5-VL-3B shape (random weights), in
alternating rounds.

    python bench/llama_cpp.py setup                       # build llama.cpp, convert (idempotent)
    python bench/llama_cpp.py run                         # every row, 2 rounds (setup first)
    python bench/llama_cpp.py run --rows ttft,decode --rounds 1
    python bench/llama_cpp.py run --family qwen2_5_vl     # the Qwen2.5-VL-3B shape

``setup`` (run by ``run`` too; each step is skipped when its output is there), into ``--work``
(default ``$TMPDIR/qwenvl-peers``): the ``llama-cpp-python`` sdist from PyPI (its
``vendor/llama.cpp`` is the source), ``llama-bench`` and ``llama-mtmd-cli`` built with cmake
(Release, ``GGML_NATIVE``), a venv for llama.cpp's converter (torch CPU, transformers, its
``gguf-py``), the random checkpoint of ``released_shapes.py`` for ``--family`` (``qwen2_vl``:
Qwen2-VL-2B, the default; ``qwen2_5_vl``: Qwen2.5-VL-3B) and its F16 GGUF and F16 mmproj (named
after the checkpoint folder, so the families never share a file).
The converter does not know the random tokenizer's pre-tokenizer hash; a small runner replaces
the method that maps the hash (``qwen2`` when it is unknown) and calls the converter's main, so
no llama.cpp file is edited.

Rows (both systems use the 2 cores; ratio > 1: qwenvl faster):

* ``ttft``: time to first token of a 512-token text prompt; llama.cpp: F16 prompt processing,
  ``llama-bench -p 512 -n 0``, TTFT = 512 / its pp rate;
* ``decode``: batch-1 decode tokens/s of 64 greedy tokens after that prompt (qwenvl bf16) against
  ``llama-bench -p 0 -n 64 -d 512`` (F16);
* ``image``: the vision encoder alone on a 1280x720 picture, and the first token of that picture
  plus "Describe this image." (qwenvl: the engine stepped as in ``cpu_speed.py``, preprocessing
  done before the clock; llama.cpp: ``llama-mtmd-cli --image`` with ``--no-warmup``, its logged
  image encode time, and for the first token llama_perf's prompt eval time, which spans the
  encode);
* ``cold``: process start to the first token of a short chat turn, files in the page cache (an
  untimed start first): a fresh ``python -c`` doing ``LLM(path)`` + ``llm.chat`` of one token
  (qwenvl's built weights cached under the work folder, the cache this process's model maps too),
  against ``llama-mtmd-cli`` with the mmproj, run to exit (the same text on its stdin: without
  ``--image`` it is a chat that reads stdin; ``-sys`` gives it the system turn the released
  template adds, so both evaluate the same ~34 tokens).

Each round runs every row, both systems one after the other (qwenvl first in odd rounds,
llama.cpp first in even ones); DRAM read bandwidth (``cpu_speed.read_bandwidth``) is read before,
between and after the two and the 1-minute load average around each run, as the box is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import cold_start
from cpu_speed import (
    IMAGE_PROMPT,
    build_inputs,
    load_qwenvl,
    make_image,
    qwenvl_run,
    qwenvl_vit,
    read_bandwidth,
)
from released_shapes import FAMILIES, RELEASED, build_checkpoint

from qwenvl.processing.chat_template import DEFAULT_SYSTEM_PROMPT
from qwenvl.processing.prompt import MediaItem

VERSION = "0.3.36"  # llama-cpp-python sdist; its vendor/llama.cpp is what is built
TARGETS = ("llama-bench", "llama-mtmd-cli")
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    f"-DLLAMA_BUILD_COMMIT=llama-cpp-python-{VERSION}",
    "-DLLAMA_BUILD_NUMBER=0",
]
CONVERTER_PACKAGES = [
    "torch==2.13.0",  # pinned: the local CPU wheel, never a multi-GB CUDA build
    "numpy<2.3",
    "sentencepiece",
    "transformers==4.57.6",
    "safetensors",
    "protobuf<5",
]
ROWS = ("ttft", "decode", "image", "cold")
THREADS = 2
DECODE_TOKENS = 64
IMAGE_QUESTION = "Describe this image."

# Runs llama.cpp's convert_hf_to_gguf.py with the pre-tokenizer lookup wrapped: argv[1] is the
# llama.cpp folder, the rest the converter's own arguments.
CONVERT_RUNNER = r"""
import runpy, sys
from pathlib import Path

root = Path(sys.argv[1])
sys.path.insert(0, str(root))
sys.argv = [str(root / "convert_hf_to_gguf.py"), *sys.argv[2:]]
from conversion.base import TextModel

known = TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:  # the random checkpoint's BPE: Qwen2's pre-tokenizer
        print("llama_cpp.py: unknown tokenizer hash, pre-tokenizer forced to 'qwen2'", flush=True)
        return "qwen2"

TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_avg() -> float:
    return os.getloadavg()[0]


# --- setup --------------------------------------------------------------------------------------
class Paths:
    """Everything the harness keeps in the work folder."""

    def __init__(self, work: Path, ckpt: Path, family: str):
        self.work = work
        self.ckpt = ckpt
        self.family = family
        self.shape = RELEASED[family]  # the released model whose exact shape is measured
        self.src = work / "llama.cpp"
        self.bin = self.src / "build" / "bin"
        self.venv = work / "convert-venv"
        self.gguf = work / "gguf"
        self.lm = self.gguf / f"{ckpt.name}-F16.gguf"
        self.mmproj = self.gguf / f"mmproj-{ckpt.name}-F16.gguf"
        self.image = work / "bench-1280x720.png"
        self.weight_cache = work / "qwenvl-weight-cache"
        self.log = work / "setup.log"


def sh(argv: list[str], paths: Paths, **kw: Any) -> None:
    """Run a setup command, its output appended to setup.log (the tail is shown on failure)."""
    shown = " ".join("<script>" if "\n" in a else a for a in argv)
    log(f"  $ {shown}")
    with open(paths.log, "a") as f:
        f.write(f"\n$ {shown}\n")
        f.flush()
        r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode:
        tail = paths.log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"failed ({r.returncode}): {shown}\n{tail}")


def fetch_source(paths: Paths) -> None:
    if (paths.src / "CMakeLists.txt").exists():
        return
    dl = paths.work / "dl"
    sdist = dl / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        log(f"downloading the llama-cpp-python {VERSION} sdist")
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={VERSION}", "-d", str(dl)], paths)  # fmt: skip
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    tmp = paths.work / "llama.cpp.part"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(tmp, members=members, filter="tar")
    tmp.rename(paths.src)
    log(f"llama.cpp source: {paths.src}")


def build(paths: Paths, jobs: int) -> None:
    if all((paths.bin / t).exists() for t in TARGETS):
        return
    if shutil.which("cmake") is None:
        sh(["apt-get", "install", "-y", "cmake"], paths)
    log(f"building {', '.join(TARGETS)} (-j{jobs}; minutes)")
    t0 = time.perf_counter()
    build_dir = str(paths.src / "build")
    sh(["cmake", "-S", str(paths.src), "-B", build_dir, *CMAKE_FLAGS], paths)
    sh(["cmake", "--build", build_dir, f"-j{jobs}", "--target", *TARGETS], paths)
    log(f"built in {time.perf_counter() - t0:.0f} s")


def converter_venv(paths: Paths) -> Path:
    python = paths.venv / "bin" / "python"
    if (paths.venv / ".complete").exists():
        return python
    log(f"converter venv: {paths.venv}")
    sh([sys.executable, "-m", "venv", "--clear", str(paths.venv)], paths)
    pip = [str(python), "-m", "pip", "install", "-q"]
    sh(pip + CONVERTER_PACKAGES, paths)
    sh(pip + ["--no-deps", str(paths.src / "gguf-py")], paths)
    sh(pip + ["tqdm", "pyyaml", "requests"], paths)  # gguf-py's own dependencies
    (paths.venv / ".complete").write_text("")
    return python


def convert(paths: Paths, python: Path, out: Path, extra: list[str]) -> None:
    if out.exists():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    log(f"converting to {out.name}")
    sh([str(python), "-c", CONVERT_RUNNER, str(paths.src), str(paths.ckpt), "--outtype", "f16",
        "--outfile", str(part), *extra], paths)  # fmt: skip
    part.rename(out)


def setup(work: Path, jobs: int, family: str) -> Paths:
    work.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(Path(tempfile.gettempdir()) / "qwenvl-bench", family, "full")
    paths = Paths(work, ckpt, family)
    fetch_source(paths)
    build(paths, jobs)
    python = converter_venv(paths)
    convert(paths, python, paths.lm, [])
    convert(paths, python, paths.mmproj, ["--mmproj"])
    if not paths.image.exists():
        make_image().save(paths.image)  # lossless PNG: both read the same pixels
    return paths


# --- llama.cpp ----------------------------------------------------------------------------------
def llama_bench(paths: Paths, args: list[str]) -> dict[str, Any]:
    argv = [str(paths.bin / "llama-bench"), "-m", str(paths.lm), "-t", str(THREADS), "-r", "1",
            "-o", "json", *args]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"llama-bench failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)[0]


def llama_ttft(paths: Paths) -> dict[str, Any]:
    rate = llama_bench(paths, ["-p", "512", "-n", "0"])["avg_ts"]
    return {"value": 512 / rate, "pp_tok_s": rate}


def llama_decode(paths: Paths) -> dict[str, Any]:
    rec = llama_bench(paths, ["-p", "0", "-n", str(DECODE_TOKENS), "-d", "512"])
    return {"value": rec["avg_ts"]}


def mtmd(paths: Paths, extra: list[str], stdin: str | None = None) -> tuple[float, str]:
    """One llama-mtmd-cli run to its exit: wall seconds and its log."""
    # -lv 4: llama_perf's timings are logged
    argv = [str(paths.bin / "llama-mtmd-cli"), "-m", str(paths.lm), "--mmproj", str(paths.mmproj),
            "-t", str(THREADS), "-n", "1", "--temp", "0", "-c", "4096", "-lv", "4",
            *extra]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(argv, input=stdin or "", capture_output=True, text=True, errors="replace")
    wall = time.perf_counter() - t0
    text = r.stdout + r.stderr
    logs = paths.work / "logs"
    logs.mkdir(exist_ok=True)
    (logs / f"mtmd-{paths.family}-{time.strftime('%H%M%S')}.log").write_text(text)
    if r.returncode:
        raise RuntimeError(f"llama-mtmd-cli failed ({r.returncode}): {text[-2000:]}")
    return wall, text


def prompt_eval(text: str) -> tuple[float, int]:
    """llama_perf's prompt eval: seconds and tokens (the image's embeddings included)."""
    m = re.search(r"prompt eval time =\s+([\d.]+) ms /\s+(\d+) tokens", text)
    if m is None:
        raise RuntimeError(f"no prompt eval time in llama-mtmd-cli's log: {text[-1500:]}")
    return float(m.group(1)) / 1000, int(m.group(2))


def llama_image(paths: Paths) -> dict[str, Any]:
    """Its logged encode time, and the first token: llama_perf's prompt eval, which runs from the
    first decode of the prompt (the text before the image) to the sync after the image's
    embeddings, so it spans the encode too (older builds: encode + prompt eval)."""
    wall, text = mtmd(paths, ["--image", str(paths.image), "-p", IMAGE_QUESTION, "--no-warmup"])
    done = re.findall(r"(?:mtmd batch encoding done|slice encoded) in (\d+) ms", text)
    encode = sum(int(x) for x in done) / 1000
    tokens = sum(int(x) for x in re.findall(r"n_tokens_batch = (\d+)", text))
    if not encode:
        raise RuntimeError(f"no image encode time in llama-mtmd-cli's log: {text[-1500:]}")
    prompt_s, prompt_tokens = prompt_eval(text)
    ttft = prompt_s if prompt_s >= encode else encode + prompt_s
    return {"vit": encode, "image_ttft": ttft, "image_tokens": tokens,
            "prompt_tokens": prompt_tokens, "wall_s": wall}  # fmt: skip


def llama_cold(paths: Paths) -> dict[str, Any]:
    # The released template's default system turn, which qwenvl's chat adds: both evaluate the
    # same conversation (llama-mtmd-cli's own chatml adds none; 22 tokens without it, not 34).
    sys_turn = ["-sys", DEFAULT_SYSTEM_PROMPT]
    wall, text = mtmd(paths, sys_turn, stdin=cold_start.SHORT_PROMPT + "\n")
    _, tokens = prompt_eval(text)  # proves the prompt was read and evaluated
    return {"value": wall, "prompt_tokens": tokens}


# --- qwenvl -------------------------------------------------------------------------------------
class Qwenvl:
    """The model under test, loaded once in this process, and its inputs (cpu_speed's)."""

    def __init__(self, paths: Paths, dtype: str, prefill_dtype: str):
        t0 = time.perf_counter()
        self.llm = load_qwenvl(paths.ckpt, dtype, None, 12845056, prefill_dtype=prefill_dtype)
        self.inputs = build_inputs(self.llm)
        small = self.llm.processor.prepare_media(
            IMAGE_PROMPT, [MediaItem("image", make_image().resize((224, 224)), {}, "image")]
        )
        log(f"qwenvl loaded in {time.perf_counter() - t0:.1f} s; image prompt "
            f"{len(self.inputs.image.token_ids)} tokens, grid "
            f"{list(self.inputs.image.images[0].grid_thw)}")  # fmt: skip
        qwenvl_run(self.llm, self.inputs.decode[:1], 4)  # warm-up of prefill and decode
        qwenvl_vit(self.llm, small.images[0])  # and of the vision encoder, on a small picture

    def ttft(self) -> dict[str, Any]:
        return {"value": qwenvl_run(self.llm, [self.inputs.long], 1)["ttft"]}

    def decode(self) -> dict[str, Any]:
        r = qwenvl_run(self.llm, [self.inputs.long], DECODE_TOKENS)
        return {"value": (DECODE_TOKENS - 1) / r["decode_s"]}

    def image(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        qwenvl_vit(self.llm, self.inputs.image.images[0])
        vit = time.perf_counter() - t0
        ttft = qwenvl_run(self.llm, [self.inputs.image], 1)["ttft"]
        image = self.inputs.image
        tokens = int(image.images[0].pixel_values.shape[0]) // 4  # 2x2 patches merged per token
        return {"vit": vit, "image_ttft": ttft, "image_tokens": tokens,
                "prompt_tokens": len(image.token_ids)}  # fmt: skip


def qwenvl_cold(paths: Paths) -> dict[str, Any]:
    """``bench/cold_start.py``'s start: a fresh process to its first token (the weight cache in
    the work folder, warm after the first round)."""
    env = {**os.environ, "QWENVL_CACHE_DIR": str(paths.weight_cache)}
    row = cold_start.run(paths.ckpt, env, decode=1)
    return {"value": row["to_first_token"], "import_s": row["import"], "load_s": row["load"],
            "first_token_s": row["first_token"], "prompt_tokens": row["prompt_tokens"]}  # fmt: skip


# --- rounds -------------------------------------------------------------------------------------
# row -> (unit, True when higher is better)
MEASURES = {
    "ttft": ("s", False),
    "decode": ("tok/s", True),
    "vit": ("s", False),
    "image_ttft": ("s", False),
    "cold": ("s", False),
}
LABELS = {
    "ttft": "TTFT 512-token text",
    "decode": "decode b1 tok/s, depth 512",
    "vit": "vision encoder 1280x720",
    "image_ttft": "image + question TTFT",
    "cold": "cold start to 1st token",
}
LABEL_ORDER = ("qwenvl", "llama.cpp")


def timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    before = load_avg()
    r = fn()
    return {**r, "load": (before, load_avg())}


def systems_for(row: str, qw: Qwenvl | None, paths: Paths) -> dict[str, Callable | None]:
    return {
        "ttft": {"qwenvl": qw.ttft if qw else None, "llama.cpp": lambda: llama_ttft(paths)},
        "decode": {"qwenvl": qw.decode if qw else None, "llama.cpp": lambda: llama_decode(paths)},
        "image": {"qwenvl": qw.image if qw else None, "llama.cpp": lambda: llama_image(paths)},
        "cold": {"qwenvl": lambda: qwenvl_cold(paths), "llama.cpp": lambda: llama_cold(paths)},
    }[row]


def ratio(name: str, q: float, ll: float) -> float:
    """> 1: qwenvl faster."""
    return q / ll if MEASURES[name][1] else ll / q


def run_row(row: str, rnd: int, systems: dict[str, Callable], family: str) -> list[dict[str, Any]]:
    order = list(systems) if rnd % 2 else list(systems)[::-1]
    bw = [read_bandwidth(3) / 1e9]
    res = {}
    for name in order:
        res[name] = timed(systems[name])
        bw.append(read_bandwidth(3) / 1e9)
    names = ["vit", "image_ttft"] if row == "image" else [row]
    out = []
    for m in names:
        key = m if row == "image" else "value"
        q, ll = res["qwenvl"][key], res["llama.cpp"][key]
        rec = {"family": family, "round": rnd, "row": m, "qwenvl": q, "llama.cpp": ll,
               "ratio": ratio(m, q, ll), "order": order, "bandwidth_GBps": bw,
               "load": {s: res[s]["load"] for s in order},
               "extra": {s: {k: v for k, v in res[s].items() if k not in (key, "load")}
                         for s in order}}  # fmt: skip
        out.append(rec)
        print_record(rec)
    return out


def print_record(rec: dict[str, Any]) -> None:
    unit = MEASURES[rec["row"]][0]
    loads = "  ".join(f"{s} {a:.2f}->{b:.2f}" for s, (a, b) in rec["load"].items())
    bw = "/".join(f"{x:.1f}" for x in rec["bandwidth_GBps"])
    log(f"{rec['family']} round {rec['round']} {LABELS[rec['row']]:27s} "
        f"qwenvl {rec['qwenvl']:7.2f} {unit:5s} llama.cpp {rec['llama.cpp']:7.2f} {unit:5s} "
        f"ratio {rec['ratio']:.2f}x | load {loads} | bandwidth {bw} GB/s | "
        f"{json.dumps(rec['extra'])}")  # fmt: skip


def summary(records: list[dict[str, Any]], shape: str) -> None:
    print(f"\n{shape} shape (random weights)")
    print("\n| round | row | qwenvl | llama.cpp | ratio (>1: qwenvl faster) | load avg around "
          "(qwenvl; llama.cpp) | DRAM read GB/s (before/between/after) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in records:
        unit = MEASURES[r["row"]][0]
        loads = "; ".join(f"{a:.2f}->{b:.2f}" for a, b in (r["load"][s] for s in LABEL_ORDER))
        bw = "/".join(f"{x:.1f}" for x in r["bandwidth_GBps"])
        print(f"| {r['round']} | {LABELS[r['row']]} | {r['qwenvl']:.2f} {unit} | "
              f"{r['llama.cpp']:.2f} {unit} | {r['ratio']:.2f}x | {loads} | {bw} |")  # fmt: skip


def per_row(records: list[dict[str, Any]]) -> None:
    """Each row over the rounds: both systems' range and the in-round ratios."""
    print("\n| row | qwenvl | llama.cpp | ratio in each round |\n|---|---|---|---|")
    for row in dict.fromkeys(r["row"] for r in records):
        rs = [r for r in records if r["row"] == row]
        unit = MEASURES[row][0]
        span = {
            s: f"{min(r[s] for r in rs):.2f}-{max(r[s] for r in rs):.2f} {unit}"
            for s in LABEL_ORDER
        }
        ratios = ", ".join(f"{r['ratio']:.2f}x" for r in rs)
        print(f"| {LABELS[row]} | {span['qwenvl']} | {span['llama.cpp']} | {ratios} |")


def run(args: argparse.Namespace, paths: Paths) -> list[dict[str, Any]]:
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; choose from {','.join(ROWS)}")
    log(
        f"{paths.shape} shape ({paths.family}): rows {rows}, {args.rounds} rounds; "
        f"load average {os.getloadavg()}"
    )
    # One built-weights cache for this process's model and the cold starts, as a user's machine
    # has one: the cold starts then map pages this model keeps in the page cache, where a second
    # copy of the cache (6-9 GB) beside it fell out of the page cache.
    os.environ["QWENVL_CACHE_DIR"] = str(paths.weight_cache)
    if "cold" in rows:  # files into the page cache, qwenvl's built-weights cache written
        log("cold start: one untimed start of each")
        qwenvl_cold(paths)
        llama_cold(paths)
    # After the cold start wrote the cache, so this model maps it too: a model built here would
    # hold a second copy in anonymous memory (12 GB beside the 3B's 9.4 GB file: swapping).
    qw = Qwenvl(paths, args.dtype, args.prefill_dtype) if set(rows) - {"cold"} else None
    records = []
    for rnd in range(1, args.rounds + 1):
        for row in rows:
            records += run_row(row, rnd, systems_for(row, qw, paths), paths.family)
    summary(records, paths.shape)
    per_row(records)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("setup", "run"))
    ap.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "qwenvl-peers",
        help="scratch folder: llama.cpp, its build, the converter venv, the GGUFs",
    )
    ap.add_argument(
        "--family",
        choices=FAMILIES,
        default="qwen2_vl",
        help="qwen2_vl: the Qwen2-VL-2B shape; qwen2_5_vl: the Qwen2.5-VL-3B one",
    )
    ap.add_argument("--jobs", type=int, default=2, help="build jobs")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated of {','.join(ROWS)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--dtype",
        default="auto",
        help="qwenvl's dtype (auto, LLM()'s default: bf16 LM weights through the decode kernels, "
        "float32 activations; bfloat16: everything in bf16)",
    )
    ap.add_argument(
        "--prefill-dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="qwenvl's prefill GEMMs and ViT: float32 (exact), bfloat16, or auto (LLM()'s "
        "default: bfloat16 on CPUs with bf16 dot products)",
    )
    ap.add_argument("--out", type=Path, help="write the records as JSON here")
    args = ap.parse_args()
    paths = setup(args.work, args.jobs, args.family)
    log(f"{paths.shape} shape: checkpoint {paths.ckpt}\n  GGUF {paths.lm}\n  mmproj {paths.mmproj}")
    if args.command == "run":
        records = run(args, paths)
        if args.out:
            args.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
