"""Memory of an AWQ checkpoint of Qwen2-VL-7B-Instruct-AWQ's exact shapes, with random weights.

    PYTHONPATH=src python bench/awq_memory.py [--cache DIR] [--tokens 64] [--json OUT]

1. Writes (once, under ``--cache`` in a folder named by its content) a checkpoint in the layout of
   ``Qwen/Qwen2-VL-7B-Instruct-AWQ``: flat config.json with its ``quantization_config`` (AWQ gemm,
   4 bits, group 128, zero points, ``modules_to_not_convert: ["visual"]``), every decoder linear as
   int32 ``qweight [in, out/8]`` / ``qzeros [in/128, out/8]`` and fp16 ``scales [in/128, out]``
   generated directly (random nibbles, zero points 7 or 8, scales ~0.0043 so that a dequantised
   weight has the spread of a normal(0, 0.02) one: the full-precision decoder never exists), and
   the vision tower, embeddings, LM head, norms and q/k/v biases as random fp16 (normal(0, 0.02),
   norm scales 1), in shards of at most 4 GB written one at a time with an index json. Config,
   tokenizer and side files come from bench/released_shapes.py (its ``7b`` shape).
2. In a fresh subprocess: ``qwenvl.LLM(path)`` (the format comes from config.json), its peak RSS
   (``ru_maxrss`` and /proc/self/status ``VmHWM``) and current RSS after loading and after decoding,
   the load time, the bytes the loaded model holds by kind, and decode tok/s at batch 1: 64 tokens
   after a short prompt, greedy, ignore_eos, timed from the first token to the last as
   bench/int4_decode.py's ``qwenvl_decode``.
3. The weight bytes from the shapes: quantized decoder (qweight + qzeros + scales) and the 16-bit
   rest, for this 7B and for Qwen2-VL-72B-Instruct-AWQ (total and per device under tensor
   parallelism 2/4/8, sharded as vLLM shards it: column-parallel q/k/v/gate/up, qkv, fc1 and
   merger.mlp.0; row-parallel o/down, proj, fc2 and merger.mlp.2 (their biases replicated);
   vocab-parallel embedding and LM head; norms and the patch embedding replicated).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from released_shapes import (  # bench/released_shapes.py
    RELEASED,
    SHAPES,
    hub_config,
    log,
    spec_of,
    tensor_shapes,
    write_side_files,
)

FAMILY = "qwen2_vl"
GROUP = 128
AWQ_CONFIG = {
    "bits": 4,
    "group_size": GROUP,
    "modules_to_not_convert": ["visual"],
    "quant_method": "awq",
    "version": "gemm",
    "zero_point": True,
}
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROW_PARALLEL = ("o_proj", "down_proj", "attn.proj", "mlp.fc2", "merger.mlp.2")
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "attn.qkv", "mlp.fc1",
                   "merger.mlp.0")  # fmt: skip
# std of a uniform 4-bit value around its zero point: sqrt((16^2 - 1) / 12) = 4.61 steps
SCALE = 0.02 / math.sqrt((16**2 - 1) / 12)
WRITER_VERSION = 1
# Qwen2-VL-72B-Instruct; its AWQ release pads intermediate_size 29568 -> 29696 (hub commit
# "pad intermediate_size to 29696 to make sure quantized model can use 8 tensor-parallel in vllm")
QWEN2_VL_72B = dict(
    hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=29568, max_pos=32768,
    mrope=[16, 24, 24], max_window_layers=80, vocab=152064, tied=False,
    released="Qwen2-VL-72B-Instruct", vision=dict(depth=32, width=1280, heads=16, mlp_ratio=4),
)  # fmt: skip
QWEN2_VL_72B_AWQ = {**QWEN2_VL_72B, "intermediate": 29696, "released": "Qwen2-VL-72B-Instruct-AWQ"}
RELEASED_7B_AWQ_FILES = 3.98e9 + 2.94e9  # the hub's listing of the two safetensors shards
GB, GiB = 1e9, 2**30


# --- the AWQ checkpoint ---------------------------------------------------------------------------
def awq_tensors(spec: str | dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of the AWQ checkpoint: name -> (shape, dtype), released names and order."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, shape in tensor_shapes(FAMILY, spec).items():
        stem, _, leaf = name.rpartition(".")
        if name.startswith("model.layers.") and stem.endswith(QUANTIZED) and leaf == "weight":
            n_out, n_in = shape
            if n_in % GROUP or n_out % 8:
                raise ValueError(f"{name} {shape}: not a whole number of AWQ groups and packs")
            out[f"{stem}.qweight"] = ((n_in, n_out // 8), torch.int32)
            out[f"{stem}.qzeros"] = ((n_in // GROUP, n_out // 8), torch.int32)
            out[f"{stem}.scales"] = ((n_in // GROUP, n_out), torch.float16)
        else:
            out[name] = (shape, torch.float16)
    return out


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Seeded per name. qweight: random nibbles; qzeros: nibbles 7 or 8; scales: SCALE * U(0.8,
    1.2); norm weights: ones; everything else normal(0, 0.02) fp16, drawn 4M values at a time."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith(".qweight"):
        return torch.randint(0, 256, (*shape[:-1], 4 * shape[-1]), generator=gen,
                             dtype=torch.uint8).view(torch.int32)  # fmt: skip
    if name.endswith(".qzeros"):
        nib = torch.randint(7, 9, (*shape[:-1], 8 * shape[-1]), generator=gen, dtype=torch.uint8)
        return (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous().view(torch.int32)
    if name.endswith(".scales"):
        return (torch.rand(shape, generator=gen) * 0.4 + 0.8).mul_(SCALE).to(torch.float16)
    if len(shape) == 1 and name.endswith(".weight"):  # RMSNorm / LayerNorm scales
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    step = 1 << 22
    for a in range(0, flat.numel(), step):
        b = min(a + step, flat.numel())
        flat[a:b] = torch.empty(b - a).normal_(0.0, 0.02, generator=gen)
    return out


def awq_config(spec: str | dict[str, Any]) -> dict[str, Any]:
    config = hub_config(FAMILY, spec)
    config["quantization_config"] = dict(AWQ_CONFIG)
    config["torch_dtype"] = "float16"
    return config


def build_awq_checkpoint(cache: Path, shape: str = "7b", seed: int = 0) -> Path:
    """The AWQ checkpoint folder of SHAPES[shape], built once; later calls reuse it."""
    from safetensors.torch import save_file

    config = awq_config(shape)
    tensors = awq_tensors(shape)
    described = sorted((n, s, str(d)) for n, (s, d) in tensors.items())
    key = json.dumps([config, described, seed, SCALE, WRITER_VERSION], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    released = spec_of(FAMILY, shape).get("released", RELEASED[FAMILY])
    out = cache / f"{released}-{shape}-AWQ-random-{digest}"
    if (out / ".complete").exists():
        return out
    log(f"building {out} ...")
    t0 = time.perf_counter()
    write_side_files(out, FAMILY, config)
    limit = 4 * 10**9
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape_, dtype) in tensors.items():
        n = nbytes(shape_, dtype)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for file, members in zip(names, shards):
        part = {n: random_tensor(n, *tensors[n], seed) for n in members}
        save_file(part, out / file, metadata={"format": "pt"})
        del part
        log(f"  wrote {file} ({(out / file).stat().st_size / GB:.2f} GB, "
            f"{time.perf_counter() - t0:.0f} s)")  # fmt: skip
    index = {
        "metadata": {"total_size": sum(nbytes(*t) for t in tensors.values())},
        "weight_map": {n: f for f, ms in zip(names, shards) for n in ms},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / ".complete").write_text("")
    log(f"built {out.name} in {time.perf_counter() - t0:.0f} s")
    return out


# --- sizes from the shapes ----------------------------------------------------------------------
def weight_bytes(spec: str | dict[str, Any]) -> dict[str, int]:
    """quantized: the decoder linears' qweight + qzeros + scales; dense16: every other tensor."""
    out = {"quantized": 0, "dense16": 0}
    for name, (shape, dtype) in awq_tensors(spec).items():
        kind = "quantized" if name.endswith((".qweight", ".qzeros", ".scales")) else "dense16"
        out[kind] += nbytes(shape, dtype)
    return out


def split_dim(name: str, shape: tuple[int, ...]) -> int | None:
    """The dimension tensor parallelism splits (None: replicated on every device)."""
    stem, _, leaf = name.rpartition(".")
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0  # vocab-parallel
    if stem.endswith(COLUMN_PARALLEL):
        # AWQ tensors are [in(/G), out(/8)]: outputs are the last dim; dense weights [out, in]
        return len(shape) - 1 if leaf in ("qweight", "qzeros", "scales") else 0
    if stem.endswith(ROW_PARALLEL):
        if leaf == "bias":
            return None  # added once after the all-reduce: every device holds all of it
        return 0 if leaf in ("qweight", "qzeros", "scales") else 1
    return None


def per_device(spec: str | dict[str, Any], tp: int) -> tuple[int, list[str]]:
    """Bytes on each of ``tp`` devices, and the tensors whose split dimension ``tp`` does not
    divide (for AWQ: into whole groups of 128 inputs / packs of 8 outputs)."""
    total, bad = 0, []
    for name, (shape, dtype) in awq_tensors(spec).items():
        dim = split_dim(name, shape)
        if dim is None:
            total += nbytes(shape, dtype)
            continue
        if shape[dim] % tp:
            bad.append(f"{name} {shape}")
        total += nbytes(shape, dtype) // tp
    return total, bad


def size_report(spec: str | dict[str, Any], label: str) -> dict[str, Any]:
    w = weight_bytes(spec)
    total = w["quantized"] + w["dense16"]
    log(f"{label}: quantized decoder {w['quantized'] / GB:.3f} GB + 16-bit rest "
        f"{w['dense16'] / GB:.3f} GB = {total / GB:.3f} GB ({total / GiB:.2f} GiB)")  # fmt: skip
    report: dict[str, Any] = {**w, "total": total, "per_device": {}}
    for tp in (2, 4, 8):
        dev, bad = per_device(spec, tp)
        report["per_device"][tp] = {"bytes": dev, "indivisible": len(bad)}
        note = f"; {len(bad)} tensors not divisible, e.g. {bad[0]}" if bad else ""
        s = spec_of(FAMILY, spec)
        if s["heads"] % tp or s["kv_heads"] % tp:
            note += f"; its {s['heads']} heads / {s['kv_heads']} KV heads do not split {tp} ways"
        log(f"    TP {tp}: {dev / GB:.2f} GB ({dev / GiB:.2f} GiB) per device{note}")
    return report


def check_released_vision_config() -> str:
    """Whether our reader takes the released 7B config.json's vision_config, which names only
    in_chans, model_type and spatial_patch_size (transformers' defaults fill the rest)."""
    from qwenvl.models import read_config

    config = awq_config("7b")
    config["vision_config"] = {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}
    with tempfile.TemporaryDirectory(prefix="awq7b_cfg") as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(config))
        try:
            read_config(path)
        except Exception as e:  # report whatever the reader says
            return f"refused: {type(e).__name__}: {e}"
    return "accepted"


# --- load and decode, in a fresh process -------------------------------------------------------
def _memory() -> dict[str, int]:
    """Bytes: ru_maxrss (the kernel's peak RSS), and VmHWM / VmRSS / RssAnon / RssFile."""
    out = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _model_bytes(model: torch.nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """The bytes the loaded model holds, by kind (the decoder's linear layers by class, the rest
    by dtype), and how many decoder linear layers of each class there are."""
    out: dict[str, int] = {}
    classes: dict[str, int] = {}
    seen: set[int] = set()
    for name, m in model.named_modules():
        linear = name.startswith("model.layers.") and "Linear" in type(m).__name__
        if linear:
            classes[type(m).__name__] = classes.get(type(m).__name__, 0) + 1
        own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        for _, t in own:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            key = f"decoder {type(m).__name__}" if linear else f"rest {str(t.dtype)[6:]}"
            out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out, classes


def child(path: Path, tokens: int, kv_memory: int) -> dict[str, Any]:
    from qwenvl import LLM, SamplingParams
    from qwenvl.engine.config import EngineConfig

    result: dict[str, Any] = {"threads": torch.get_num_threads(), "before_load": _memory()}
    engine = EngineConfig(enable_prefix_caching=False, encoder_cache_memory=0,
                          kv_cache_memory=kv_memory, max_num_seqs=1)  # fmt: skip
    t = time.perf_counter()
    llm = LLM(path, engine_config=engine)
    result["load_s"] = time.perf_counter() - t
    result["after_load"] = _memory()
    result["weight_format"] = llm.weight_format
    result["model_bytes"], result["decoder_linear_classes"] = _model_bytes(llm.model)
    head = llm.model.lm_head
    result["lm_head"] = type(head).__name__
    result["lm_head_bytes"] = sum(
        t.numel() * t.element_size() for t in [*head.parameters(), *head.buffers()] if t is not None
    )

    prompt = llm.processor.prepare_text(
        "Describe this image in detail. What is in the picture? Count the boxes and the circles."
    )
    result["prompt_tokens"] = len(prompt.token_ids)
    eng = llm.engine
    # warm-up (4 tokens, with log-probs: the random weights must give finite ones)
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    req = eng.requests[eng.add_request(prompt, warm)]
    while not req.finished:
        eng.step()
    eng.pop_finished(req.request_id)
    result["warmup_cumulative_logprob"] = req.sequences[0].cumulative_logprob
    result["finite"] = math.isfinite(req.sequences[0].cumulative_logprob)

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    req = eng.requests[eng.add_request(prompt, params)]
    first = None
    while not req.finished:
        eng.step()
        if first is None and req.sequences[0].token_ids:
            first = time.perf_counter()
    end = time.perf_counter()
    eng.pop_finished(req.request_id)
    assert first is not None
    result["first_token_s"] = first - t0
    result["generated"] = len(req.sequences[0].token_ids)
    result["decode_tok_s"] = (result["generated"] - 1) / (end - first)
    result["after_decode"] = _memory()
    return result


def run_child(path: Path, tokens: int, kv_memory: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(path), "--tokens", str(tokens),
           "--kv-memory", str(kv_memory)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-12000:])
        raise SystemExit(f"the load/decode subprocess failed (exit {proc.returncode})")
    if proc.stderr.strip():
        log("child stderr (tail):\n" + proc.stderr[-1500:])
    return json.loads(lines[-1].removeprefix("RESULT "))


def _mem_line(label: str, m: dict[str, int]) -> str:
    g = {k: v / GiB for k, v in m.items()}
    return (
        f"{label:>13}: ru_maxrss {g['ru_maxrss']:6.2f} GiB  VmHWM {g['VmHWM']:6.2f} GiB  "
        f"VmRSS {g['VmRSS']:6.2f} GiB (anon {g['RssAnon']:.2f}, file {g['RssFile']:.2f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "awq7b_cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--kv-memory", type=int, default=256 * 2**20, help="EngineConfig bytes")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.child, args.tokens, args.kv_memory)), flush=True)
        return

    assert "7b" in SHAPES
    report: dict[str, Any] = {"sizes": {}}
    log("# weight bytes from the shapes (AWQ gemm, 4-bit, group 128; the rest fp16)")
    report["sizes"]["7b"] = size_report("7b", "Qwen2-VL-7B-Instruct-AWQ")
    log(f"    (the released files: {RELEASED_7B_AWQ_FILES / GB:.2f} GB, the hub's 3.98 + 2.94 GB)")
    report["sizes"]["72b_awq"] = size_report(QWEN2_VL_72B_AWQ, "Qwen2-VL-72B-Instruct-AWQ")
    report["sizes"]["72b_unpadded"] = size_report(
        QWEN2_VL_72B, "72B with the base model's intermediate 29568"
    )
    report["released_vision_config"] = check_released_vision_config()
    log(f"# reader on the released 7B config.json's vision_config: "
        f"{report['released_vision_config']}")  # fmt: skip

    path = build_awq_checkpoint(args.cache, "7b", args.seed)
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    report["checkpoint"], report["on_disk"] = str(path), on_disk
    log(f"# checkpoint {path}: {on_disk / GB:.3f} GB of safetensors")
    if args.build_only:
        return
    log(f"# loading and decoding in a subprocess ({args.tokens} tokens, batch 1) ...")
    r = run_child(path, args.tokens, args.kv_memory)
    report["run"] = r
    log(f"weight format {r['weight_format']}, decoder linears {r['decoder_linear_classes']}, "
        f"lm_head {r['lm_head']}, {r['threads']} threads")  # fmt: skip
    log("model holds: " + ", ".join(f"{k} {v / GB:.3f} GB" for k, v in r["model_bytes"].items())
        + f" (sum {sum(r['model_bytes'].values()) / GB:.3f} GB)")  # fmt: skip
    step = sum(v for k, v in r["model_bytes"].items() if k.startswith("decoder"))
    step += r["lm_head_bytes"]
    log(f"a decode step streams {step / GB:.2f} GB (decoder linears + LM head "
        f"{r['lm_head_bytes'] / GB:.2f} GB): {step * r['decode_tok_s'] / GB:.1f} GB/s at the "
        "measured tok/s")  # fmt: skip
    log(_mem_line("before load", r["before_load"]))
    log(_mem_line("after load", r["after_load"]))
    log(_mem_line("after decode", r["after_decode"]))
    extra = (r["after_load"]["VmHWM"] - r["after_load"]["VmRSS"]) / GiB
    log(f"peak during load exceeds the loaded model's RSS by {extra:.2f} GiB")
    log(f"load {r['load_s']:.1f} s; prompt {r['prompt_tokens']} tokens, first token "
        f"{r['first_token_s']:.2f} s; decode {r['decode_tok_s']:.2f} tok/s batch 1 "
        f"({r['generated']} tokens); warm-up log-prob finite: {r['finite']}")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
