#!/usr/bin/env bash
# One short check of qwenvl on a single NVIDIA GPU (tensor_parallel_size=1 only), about 5 minutes:
#
#   bash bench/gpu_check.sh            # from a fresh copy of the repo; outputs in $OUT or /tmp/gpu_check
#
#   env      nvidia-smi, python, torch / CUDA versions
#   deps     only if `import qwenvl` (with src/ on the path), pytest or transformers 5.23.0 fails:
#            pip install -e .[dev] with torch pinned to the installed build (never replaced by
#            another, CUDA or not); offline, the missing pieces alone
#   parity   tests/tiny.py checkpoints of both families on cuda, tp=1, float32 and bfloat16:
#            greedy tokens and the largest |log-prob difference| of the chosen tokens against
#            transformers on cuda (teacher-forced), and the same tokens from qwenvl on the CPU
#   speed    bench/released_shapes.py's random Qwen2-VL-2B ("full") checkpoint on cuda (no bench
#            script has a --device option): batch-1 and batch-4 decode tok/s (64 tokens, greedy,
#            ignore_eos, timed from the first token as bench/cpu_speed.py), TTFT of 256- and
#            1024-token text prompts, peak CUDA memory
#   tests    pytest -m gpu (tests/layers/test_sampler.py's CUDA sampling test; the tests have no
#            device variable), then tests/models/test_parity_hf.py (its LLMs run on the CPU)
#
# Every step runs under `timeout` (and within $BUDGET seconds in all, default 330); a failing
# step is logged and the next one runs. Logs: $OUT/<step>.log, one line per step in
# $OUT/summary.txt, numbers in $OUT/cuda_parity.json and $OUT/cuda_speed.json. The 4.4 GB bench
# checkpoint is built under $BENCH_CACHE (default /tmp/qwenvl-bench), never under $OUT.
# SKIP=step,step... leaves steps out. A CPU dry run of the inline Python:
#   DEVICE=cpu SHAPE=small SKIP=parity_tests bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
BUDGET=${BUDGET:-330}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-full}
BENCH_CACHE=${BENCH_CACHE:-/tmp/qwenvl-bench}
START=$(date +%s)
if [ -z "${PYTHON:-}" ]; then
    PYTHON=$(command -v python || command -v python3)
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 DEVICE SHAPE BENCH_CACHE OUT
export TOKENIZERS_PARALLELISM=false

# step NAME LIMIT CMD...: run CMD (an exported function) in bash under timeout (LIMIT or what is left of BUDGET), log, go on.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [[ ",${SKIP:-}," == *",$name,"* ]]; then
        echo "SKIP $name: in \$SKIP" | tee -a "$SUMMARY"
        return 0
    fi
    if [ "$left" -lt 15 ]; then
        echo "SKIP $name: the ${BUDGET} s budget is spent" | tee -a "$SUMMARY"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (timeout ${limit} s) ==="
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c "$*" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 40 "$OUT/$name.log"
    local verdict=ok
    [ "$rc" -ne 0 ] && verdict="FAILED (exit $rc)"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMED OUT after ${limit} s"; fi
    if [ "$name" = gpu_tests ] && [ "$rc" -eq 5 ]; then verdict="no test selected (exit 5)"; fi
    echo "$name: $verdict in $(($(date +%s) - t0)) s (log $OUT/$name.log)" | tee -a "$SUMMARY"
    return 0
}

env_info() {
    nvidia-smi || echo "nvidia-smi failed"
    echo "python: $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" - <<'EOF'
import os
try:
    import torch
except Exception as e:
    print("torch: not importable:", e)
    raise SystemExit(0)
print("torch", torch.__version__, "cuda build", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version(), "available", torch.cuda.is_available())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
print("cpus", len(os.sched_getaffinity(0)))
for mod in ("transformers", "pytest", "flash_attn", "qwenvl"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:
        print(mod, "not importable:", type(e).__name__, e)
EOF
}

ensure_deps() {
    # the parity tests and checks are written against transformers 5.23.0 (pyproject's pin)
    if "$PYTHON" -c "import qwenvl, pytest, transformers as t; assert t.__version__ == '5.23.0'" \
        2>/dev/null; then
        echo "qwenvl, pytest and transformers 5.23.0 import: nothing to install"
        return 0
    fi
    local cons=$OUT/constraints.txt
    : >"$cons"
    local tv
    # pin the installed torch (its own local version, e.g. 2.5.1+cu124): pip keeps it as it is
    if tv=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null); then
        echo "torch==$tv" >"$cons"
        echo "torch $tv installed: pinned"
    else
        echo "no torch installed: pip will choose one"
    fi
    "$PYTHON" -m pip install -c "$cons" -e ".[dev]" && return 0
    echo "the editable install failed (offline?): trying the missing pieces alone"
    "$PYTHON" -m pip install -c "$cons" "safetensors>=0.4" "tokenizers>=0.19" "jinja2>=3.1" \
        "pillow>=10.0" "numpy>=1.24" "ninja>=1.11" "transformers==5.23.0" "pytest>=8"
    "$PYTHON" -c "import qwenvl, pytest, transformers as t; print('imports ok, transformers', t.__version__)"
}

cuda_parity() {
    "$PYTHON" - <<'EOF'
"""tp=1 on one device against transformers on the same device, tiny checkpoints (tests/tiny.py)."""
import json, os, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, "tests")
import tiny  # tests/tiny.py
from qwenvl import LLM, SamplingParams

dev = os.environ.get("DEVICE", "cuda")
out_dir = Path(os.environ.get("OUT", "/tmp/gpu_check"))
prompts = [
    "Count the boxes in the picture.",
    "Describe this image. What is in the picture? Count the boxes.",
    "The red box is on the left and the blue box is",
]
params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
report, failed = {}, False
root = Path(tempfile.mkdtemp(prefix="qwenvl_gpu_parity"))
for family in ("qwen2_vl", "qwen2_5_vl"):
    ck = tiny.build_checkpoint(root / family, family)
    hf = tiny.load_hf(ck, family).to(dev)
    os.environ["QWENVL_KERNELS"] = "0"  # the CPU reference needs no kernel build here
    cpu = LLM(ck, dtype="float32", device="cpu")
    cpu_tokens = [list(o.outputs[0].token_ids) for o in cpu.generate(prompts, params)]
    del cpu
    os.environ.pop("QWENVL_KERNELS")
    for dtype in ("float32", "bfloat16"):
        t = time.perf_counter()
        llm = LLM(ck, dtype=dtype, device=dev, tensor_parallel_size=1)
        load_s = time.perf_counter() - t
        outs = llm.generate(prompts, params)
        agree, gap, same_cpu = 0, 0.0, 0
        for o, ref_cpu in zip(outs, cpu_tokens):
            ids, gen = list(o.prompt_token_ids), list(o.outputs[0].token_ids)
            seq = torch.tensor([ids + gen], device=dev)
            with torch.no_grad():
                logits = hf(input_ids=seq, mm_token_type_ids=torch.zeros_like(seq)).logits[0]
            ref = torch.log_softmax(logits[len(ids) - 1 : -1].double(), -1)
            agree += ref.argmax(-1).tolist() == gen
            same_cpu += gen == ref_cpu
            ours = [d[t] for d, t in zip(o.outputs[0].logprobs, gen)]
            theirs = ref[torch.arange(len(gen)), torch.tensor(gen)].tolist()
            gap = max(gap, *(abs(float(a) - b) for a, b in zip(ours, theirs)))
        n = len(prompts)
        ok = agree == n and gap < 1e-3 if dtype == "float32" else True
        failed |= not ok
        report[f"{family} {dtype}"] = dict(
            device=str(llm.model.device), load_s=load_s, greedy_match_hf=f"{agree}/{n}",
            same_tokens_as_cpu_fp32=f"{same_cpu}/{n}", max_abs_logprob_diff=gap, ok=ok,
        )
        print(f"PARITY {family} {dtype} on {llm.model.device}: greedy tokens = transformers' "
              f"fp32 argmax {agree}/{n}, = qwenvl CPU fp32 {same_cpu}/{n}, max |log-prob diff| "
              f"{gap:.2e} ({'ok' if ok else 'FAIL'}{'' if dtype == 'float32' else ', informational'})",
              flush=True)
        del llm
    del hf
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
(out_dir / "cuda_parity.json").write_text(json.dumps(report, indent=2))
sys.exit(1 if failed else 0)
EOF
}

cuda_speed() {
    "$PYTHON" - <<'EOF'
"""Decode tok/s and TTFT of the Qwen2-VL-2B shape (random weights) on one device, tp=1."""
import json, os, statistics, sys, time
from pathlib import Path

import torch

sys.path.insert(0, "bench")
from cpu_speed import DECODE_PROMPTS, cut, qwenvl_run  # bench/cpu_speed.py
from released_shapes import CORPUS, build_checkpoint  # bench/released_shapes.py

from qwenvl import LLM
from qwenvl.engine.config import EngineConfig

dev = os.environ.get("DEVICE", "cuda")
shape = os.environ.get("SHAPE", "full")
out_dir = Path(os.environ.get("OUT", "/tmp/gpu_check"))
t = time.perf_counter()
path = build_checkpoint(Path(os.environ.get("BENCH_CACHE", "/tmp/qwenvl-bench")), "qwen2_vl", shape)
print(f"checkpoint {path} ({time.perf_counter() - t:.0f} s)", flush=True)
engine = EngineConfig(kv_cache_memory=2 << 30, enable_prefix_caching=False,
                      encoder_cache_memory=0, max_num_seqs=8)
t = time.perf_counter()
llm = LLM(path, device=dev, tensor_parallel_size=1, engine_config=engine)
load_s = time.perf_counter() - t
dtype = str(llm.model.dtype)
print(f"loaded on {llm.model.device} in {load_s:.1f} s: {dtype}, weights {llm.weight_format}",
      flush=True)
proc = llm.processor
decode = [proc.prepare_text(p) for p in DECODE_PROMPTS]
n = min(len(p.token_ids) for p in decode)
decode = [cut(p, n) for p in decode]
long_ids = proc.prepare_text(" ".join(CORPUS) * 40)
ttft_prompts = {k: cut(long_ids, k) for k in (256, 1024)}
N, REPS = 64, 3
for b in (1, 4):  # warm-up
    qwenvl_run(llm, decode[:b], 8)
for p in ttft_prompts.values():
    qwenvl_run(llm, [p], 1)
res = {"device": str(llm.model.device), "dtype": dtype, "weight_format": llm.weight_format,
       "load_s": load_s, "decode_tokens": N, "decode_prompt_tokens": n}
for b in (1, 4):
    rates = []
    for _ in range(REPS):
        r = qwenvl_run(llm, decode[:b], N)
        rates.append(b * (N - 1) / r["decode_s"])
    res[f"decode_b{b}_tok_s"] = rates
    print(f"SPEED decode batch {b}: {', '.join(f'{x:.1f}' for x in rates)} tok/s "
          f"(median {statistics.median(rates):.1f}; {N} tokens after {n}-token prompts)", flush=True)
for k, p in ttft_prompts.items():
    times = [qwenvl_run(llm, [p], 1)["ttft"] for _ in range(REPS)]
    res[f"ttft_{k}_s"] = times
    print(f"SPEED TTFT {k}-token prompt: {', '.join(f'{x * 1e3:.1f}' for x in times)} ms "
          f"(best {min(times) * 1e3:.1f})", flush=True)
if dev.startswith("cuda"):
    res["max_memory_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"peak CUDA memory allocated {res['max_memory_allocated_GiB']:.2f} GiB "
          f"(KV cache {llm.engine.kv.nbytes / 2**30:.2f} GiB)")
(out_dir / "cuda_speed.json").write_text(json.dumps(res, indent=2))
EOF
}

gpu_tests() {
    "$PYTHON" -m pytest -q -rs -m gpu tests -p no:cacheprovider
}

parity_tests() {
    "$PYTHON" -m pytest -x -q tests/models/test_parity_hf.py -p no:cacheprovider
}

export PYTHON
export -f env_info ensure_deps cuda_parity cuda_speed gpu_tests parity_tests
echo "qwenvl GPU check: $(date -u), repo $ROOT ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)), device $DEVICE, out $OUT" |
    tee -a "$SUMMARY"
step env 30 env_info
step deps 150 ensure_deps
step cuda_parity 120 cuda_parity
step cuda_speed 200 cuda_speed
step gpu_tests 60 gpu_tests
step parity_tests 180 parity_tests
echo "total $(($(date +%s) - START)) s" | tee -a "$SUMMARY"
echo "=== summary ==="
cat "$SUMMARY"
grep -h "^PARITY\|^SPEED" "$OUT"/cuda_parity.log "$OUT"/cuda_speed.log 2>/dev/null
exit 0
