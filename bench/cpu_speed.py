"""CPU speed of qwenvl against transformers, on the same inputs, in one run.

Random-weight checkpoints of the exact released shapes of Qwen2-VL-2B-Instruct and
Qwen2.5-VL-3B-Instruct (flat hub config.json, bf16 safetensors with the released tensor names,
the special tokens at their released ids) are built once into ``--cache``. Each family is then
measured with qwenvl and with transformers, one model in memory at a time:

* machine: DRAM read bandwidth and fp32/bf16 GEMM peaks (the bounds below use them; bandwidth is
  read again after each framework and the highest reading sets the decode bound);
* decode tokens/s at batch 1 and 4 (greedy, EOS ignored, time after the first token only);
* aggregate tokens/s of 8 concurrent requests (prefill included);
* time to first token of a 512-token text prompt and of a 1280x720 image prompt;
* the vision tower alone on that image.

``--shape small`` keeps the structure with small widths/depths (a smoke run of about a minute)
and checks that both frameworks produce the same greedy tokens in float32. See bench/README.md.

    PYTHONPATH=src python bench/cpu_speed.py --shape small
    PYTHONPATH=src python bench/cpu_speed.py --out /tmp/cpu_speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from released_shapes import (  # bench/released_shapes.py
    CORPUS,
    FAMILIES,
    PAD_ID,
    RELEASED,
    SHAPES,
    build_checkpoint,
    log,
)

IMAGE_SIZE = (1280, 720)  # width, height
UNQUANTIZED = "qwenvl unquantized"  # with --quantization: the same model without, in the rounds
DECODE_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a language model generates text, step by step.",
    "Describe the picture: a red box, a blue circle and a green line.",
    "Count from one to ten and then tell me about the quick brown fox.",
]
CONCURRENT_PROMPTS = [
    "Hello!",
    "Describe this image in detail.",
    "Write a short story about a robot who learns to paint landscapes at night.",
    "What is the capital of France?",
    "Explain how a transformer language model generates text one token at a time, briefly.",
    "Count the boxes.",
    "The quick brown fox jumps over the lazy dog. Continue the story.",
    "Give me three ideas for a birthday present for a friend who likes hiking and music.",
]
IMAGE_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


# --- inputs -------------------------------------------------------------------------------------
def make_image():
    """A deterministic 1280x720 RGB picture: colour gradients plus a few shapes."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = IMAGE_SIZE
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    rgb = np.stack(
        [np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)), (x + y) / 2 % 256], axis=-1
    )
    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((100, 100, 400, 300), fill=(220, 30, 30), outline=(0, 0, 0), width=5)
    draw.ellipse((700, 200, 1000, 500), fill=(30, 60, 220))
    draw.line((0, 700, 1280, 50), fill=(20, 200, 40), width=9)
    draw.text((500, 600), "qwenvl bench 1280x720", fill=(255, 255, 255))
    return image


@dataclasses.dataclass
class Inputs:
    """Token ids (and pixels) shared by both frameworks, plus qwenvl's PromptInputs for them."""

    decode: list[Any]  # 4 PromptInputs of equal length
    concurrent: list[str]
    concurrent_ids: list[list[int]]
    long: Any  # 512-token PromptInputs
    image: Any  # PromptInputs with one image
    preprocess_s: float


def build_inputs(llm) -> Inputs:
    proc = llm.processor
    decode = [proc.prepare_text(t) for t in DECODE_PROMPTS]
    n = min(len(p.token_ids) for p in decode)
    decode = [cut(p, n) for p in decode]
    long_text = " ".join(CORPUS) * 10
    long = cut(proc.prepare_text(long_text), 512)
    from qwenvl.processing.prompt import MediaItem

    image = make_image()
    t0 = time.perf_counter()
    image_inputs = proc.prepare_media(IMAGE_PROMPT, [MediaItem("image", image, {}, "image")])
    preprocess = time.perf_counter() - t0
    return Inputs(
        decode=decode,
        concurrent=CONCURRENT_PROMPTS,
        concurrent_ids=[llm.tokenizer.encode(t) for t in CONCURRENT_PROMPTS],
        long=long,
        image=image_inputs,
        preprocess_s=preprocess,
    )


def cut(prompt, n: int):
    """A text-only prompt cut to its first n tokens (positions are plain 0..n-1 on all axes)."""
    if len(prompt.token_ids) < n:
        raise ValueError(f"the prompt has {len(prompt.token_ids)} tokens, fewer than {n}")
    return dataclasses.replace(
        prompt, token_ids=prompt.token_ids[:n], positions=prompt.positions[:, :n]
    )


# --- machine ------------------------------------------------------------------------------------
def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_bandwidth(reps: int) -> float:
    """Bytes/s of summing a 1 GiB fp32 tensor (all threads), best of reps, the tensor in 4 KB pages
    and in 2 MB pages (``kernels.huge_page_copy``, as qwenvl keeps packed weights): the faster
    sets the bound, so that qwenvl's huge pages never count as the machine's bandwidth."""
    from qwenvl import kernels

    x = torch.ones(2**28)
    rates = []
    for t in (x, kernels.huge_page_copy(x)):
        t.sum()
        rates.append(t.numel() * 4 / best(t.sum, reps))
        del t
    return max(rates)


def gemm_peak(dtype: torch.dtype, reps: int, max_s: float) -> tuple[float, int]:
    """GFLOP/s of F.linear (x @ W.T, the layout of nn.Linear) on square matrices, growing to
    2048 unless the next size would take over max_s. Not `a @ b`: without bf16 instructions,
    torch's bf16 NN matmul is ~10x slower than the NT one the models use."""
    n = 256
    while True:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        t0 = time.perf_counter()
        F.linear(a, b)
        if n >= 2048 or 8 * (time.perf_counter() - t0) > max_s:
            break
        n *= 2
    t = best(lambda: F.linear(a, b), reps)
    return 2 * n**3 / t / 1e9, n


def measure_machine(reps: int, max_s: float) -> dict[str, float]:
    bw = read_bandwidth(reps)
    log(f"machine: DRAM read bandwidth {bw / 1e9:.1f} GB/s (sum of 1 GiB fp32 in 4 KB and 2 MB "
        f"pages, best of {reps})")  # fmt: skip
    out = {"dram_read_GBps": bw / 1e9}
    for dtype in (torch.float32, torch.bfloat16):
        gflops, n = gemm_peak(dtype, reps, max_s)
        name = str(dtype).removeprefix("torch.")
        out[f"{name}_gemm_GFLOPs"] = gflops
        out[f"{name}_gemm_size"] = n
        log(f"machine: {name} GEMM (F.linear) {n}x{n}x{n}: {gflops:.1f} GFLOP/s (best of {reps})")
    return out


def record_bandwidth(machine: dict[str, Any], bw: float) -> None:
    """Keep a reading (GB/s); the decode bound uses the highest of the run."""
    samples = machine.setdefault("dram_read_GBps_samples", [machine["dram_read_GBps"]])
    samples.append(bw)
    machine["dram_read_GBps"] = max(samples)


def remeasure_bandwidth(machine: dict[str, Any], reps: int = 5) -> None:
    """Read bandwidth again after a framework's measurements: on a shared machine it moves by
    20 % or more between minutes, and the decode bound takes the highest reading of the run, so
    that a quiet moment of the machine is never mistaken for the bound of a busy one."""
    bw = read_bandwidth(reps) / 1e9
    record_bandwidth(machine, bw)
    log(f"  machine: DRAM read bandwidth now {bw:.1f} GB/s (highest of the run "
        f"{machine['dram_read_GBps']:.1f}, used for the bound)")  # fmt: skip


# --- qwenvl -------------------------------------------------------------------------------------
def load_qwenvl(
    path: Path, dtype: str, quantization: str | None, max_pixels: int | None, **more: Any
):
    from qwenvl import LLM
    from qwenvl.engine.config import EngineConfig

    # No prefix or encoder cache: every timed run recomputes everything, as transformers does.
    engine = EngineConfig(
        enable_prefix_caching=False,
        encoder_cache_memory=0,
        kv_cache_memory=1 << 30,
        max_num_seqs=16,
    )
    kwargs: dict[str, Any] = dict(dtype=dtype, engine_config=engine, max_pixels=max_pixels, **more)
    if quantization is not None:
        if "quantization" not in inspect.signature(LLM.__init__).parameters:
            raise SystemExit(
                "--quantization: this qwenvl's LLM() takes no 'quantization' argument yet"
            )
        kwargs["quantization"] = quantization
    return LLM(path, **kwargs)


def qwenvl_run(llm, prompts: list, max_tokens: int, **options: Any) -> dict[str, Any]:
    """Drive the engine over the prompts; times to the first token of all and to the end.
    ``options``: more ``SamplingParams`` fields (``structured=...``)."""
    from qwenvl import SamplingParams

    params = SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True, repetition_penalty=1.0, **options
    )
    eng = llm.engine
    t0 = time.perf_counter()
    reqs = [eng.requests[eng.add_request(p, params)] for p in prompts]
    first = None
    while not all(r.finished for r in reqs):
        eng.step()
        if first is None and all(s.token_ids for r in reqs for s in r.sequences):
            first = time.perf_counter()
    end = time.perf_counter()
    for r in reqs:
        eng.pop_finished(r.request_id)
    return {
        "ttft": first - t0,
        "decode_s": end - first,
        "total_s": end - t0,
        "tokens": [r.sequences[0].token_ids for r in reqs],
    }


def qwenvl_generate(llm, prompts: list[str], max_tokens: int) -> tuple[float, list[list[int]]]:
    from qwenvl import SamplingParams

    params = SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True, repetition_penalty=1.0
    )
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    t = time.perf_counter() - t0
    return t, [list(o.outputs[0].token_ids) for o in outs]


def qwenvl_vit(llm, image) -> torch.Tensor:
    with torch.inference_mode():
        return llm.model.encode_vision(image.pixel_values, [image.grid_thw])


# --- transformers -------------------------------------------------------------------------------
def load_hf(path: Path, family: str, dtype: str):
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    cls = Qwen2_5_VLForConditionalGeneration
    if family == "qwen2_vl":
        cls = Qwen2VLForConditionalGeneration
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    # Greedy, no EOS (so exactly max_new_tokens, like ignore_eos), no repetition penalty.
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=None, pad_token_id=PAD_ID, bos_token_id=PAD_ID
    )
    return model


class Clock:
    """A transformers streamer recording when each put() arrives (prompt first, then tokens)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_batch(ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """Left-padded input_ids and attention_mask."""
    n = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), n), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, n - len(x) :] = torch.tensor(x)
        mask[i, n - len(x) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def hf_run(model, inputs: dict[str, torch.Tensor], max_tokens: int) -> dict[str, Any]:
    clock = Clock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=max_tokens, streamer=clock)
        end = time.perf_counter()
    first = clock.times[1]  # times[0]: the prompt
    n = inputs["input_ids"].shape[1]
    return {
        "ttft": first - t0,
        "decode_s": clock.times[-1] - first,
        "total_s": end - t0,
        "tokens": out[:, n:].tolist(),
    }


def hf_image_inputs(image) -> dict[str, torch.Tensor]:
    """Our pixel_values / grid (bit-identical to transformers' PIL preprocessing) and ids."""
    return {
        "input_ids": torch.tensor([image.token_ids]),
        "attention_mask": torch.ones(1, len(image.token_ids), dtype=torch.long),
        "pixel_values": image.images[0].pixel_values,
        "image_grid_thw": torch.tensor([image.images[0].grid_thw]),
    }


def hf_vit(model, image) -> torch.Tensor:
    px = image.pixel_values
    grid = torch.tensor([image.grid_thw])
    with torch.inference_mode():
        out = model.model.get_image_features(px, grid)
    feats = getattr(out, "pooler_output", out)
    return torch.cat(list(feats)) if isinstance(feats, (tuple, list)) else feats


# --- one framework over one family --------------------------------------------------------------
def run_prompts(framework: str, model, prompts: list, n: int) -> dict[str, Any]:
    """One greedy run of text prompts for n new tokens by either framework, timed inside."""
    if framework == "qwenvl":
        return qwenvl_run(model, prompts, n)
    return hf_run(model, hf_batch([p.token_ids for p in prompts]), n)


def decode_once(framework: str, model, inputs: Inputs, b: int, n: int) -> dict[str, Any]:
    """One greedy decode of the first b prompts for n new tokens."""
    return run_prompts(framework, model, inputs.decode[:b], n)


def log_decode(framework: str, b: int, n: int, r: dict[str, Any], inputs: Inputs) -> float:
    rate = b * (n - 1) / r["decode_s"]
    ids = inputs.decode[0].token_ids
    log(f"  {framework} decode batch {b}: {rate:.2f} tok/s (prompt {len(ids)} tokens, {n} new, "
        f"decode {r['decode_s']:.2f} s)")  # fmt: skip
    return rate


def measure(framework: str, model, inputs: Inputs, args, only: set[str]) -> dict[str, Any]:
    """Every selected measurement, each after a warm-up of the same work."""
    n = args.decode_tokens
    reps = args.repeat
    res: dict[str, Any] = {}
    is_q = framework == "qwenvl"

    def timed(fn, key, reps=reps):
        fn()  # warm-up
        runs = [fn() for _ in range(reps)]
        return min(runs, key=lambda r: r[key])

    if "decode" in only:
        for b in (1, 4):
            r = timed(lambda b=b: decode_once(framework, model, inputs, b, n), "decode_s")
            res[f"decode_b{b}_tok_s"] = log_decode(framework, b, n, r, inputs)
            res[f"decode_b{b}_tokens"] = r["tokens"]
    if "concurrent" in only:
        if is_q:

            def fn():
                t, toks = qwenvl_generate(model, inputs.concurrent, n)
                return {"total_s": t, "tokens": toks}
        else:

            def fn():
                return hf_run(model, hf_batch(inputs.concurrent_ids), n)

        r = timed(fn, "total_s")
        rate = len(inputs.concurrent) * n / r["total_s"]
        res["concurrent8_tok_s"] = rate
        res["concurrent8_tokens"] = r["tokens"]
        log(f"  {framework} 8 concurrent requests: {rate:.2f} tok/s aggregate "
            f"({n} new each, {r['total_s']:.2f} s wall, prefill included)")  # fmt: skip
    if "ttft" in only:
        r = timed(lambda: run_prompts(framework, model, [inputs.long], 1), "ttft")
        res["ttft_text512_s"] = r["ttft"]
        log(f"  {framework} TTFT 512-token text prompt: {r['ttft']:.3f} s")
    if "image" in only:
        if is_q:

            def fn():
                return qwenvl_run(model, [inputs.image], 1)
        else:

            def fn():
                return hf_run(model, hf_image_inputs(inputs.image), 1)

        r = timed(fn, "ttft")
        res["ttft_image_s"] = r["ttft"]
        res["image_first_token"] = r["tokens"][0]
        grid = inputs.image.images[0].grid_thw
        log(f"  {framework} TTFT 1280x720 image (grid {list(grid)}, "
            f"{len(inputs.image.token_ids)} prompt tokens): {r['ttft']:.3f} s")  # fmt: skip
    if "vit" in only:
        im = inputs.image.images[0]
        vit = (lambda: qwenvl_vit(model, im)) if is_q else (lambda: hf_vit(model, im))
        if not args.no_vit_warmup:
            vit()
        t = best(vit, reps)
        res["vit_s"] = t
        log(f"  {framework} ViT alone ({im.pixel_values.shape[0]} patches): {t:.3f} s")
    return res


def decode_rounds(
    entries: dict[str, tuple[str, Any]],
    inputs: Inputs,
    args,
    machine: dict[str, Any],
    bytes_tok: int,
) -> dict[str, dict[str, Any]]:
    """The decode rows of every entry (label -> (framework, model)) in alternation: each round
    runs batch 1 of every entry in turn, then batch 4. Measured one model after the other,
    minutes apart, a shared machine's bandwidth moves by 20 % or more between them; in rounds
    they all see the same minutes. Best round per row, as elsewhere. The first entry is the
    qwenvl model under test: bandwidth is read just before and after each of its batch-1 runs,
    and its share of the bound is also taken against the higher of those two readings (the
    machine's bandwidth while it ran). Each round's batch-1 rates are kept, so ratios can be
    taken within a round."""  # fmt: skip
    n = args.decode_tokens
    out: dict[str, dict[str, Any]] = {label: {} for label in entries}
    first = next(iter(entries))
    for b in (1, 4):  # warm-up
        for framework, model in entries.values():
            decode_once(framework, model, inputs, b, n)
    shares, per_round = [], []
    for i in range(args.repeat):
        log(f"  round {i + 1}/{args.repeat}")
        for b in (1, 4):
            rates = {}
            for label, (framework, model) in entries.items():
                watch = b == 1 and label == first
                before = read_bandwidth(3) / 1e9 if watch else 0.0
                r = decode_once(framework, model, inputs, b, n)
                rate = rates[label] = log_decode(label, b, n, r, inputs)
                if watch:
                    after = read_bandwidth(3) / 1e9
                    record_bandwidth(machine, before)
                    record_bandwidth(machine, after)
                    shares.append(rate * bytes_tok / (max(before, after) * 1e9))
                    log(f"    bandwidth around it {before:.1f} / {after:.1f} GB/s: "
                        f"{100 * shares[-1]:.0f}% of that bound")  # fmt: skip
                res = out[label]
                if rate > res.get(f"decode_b{b}_tok_s", 0):
                    res[f"decode_b{b}_tok_s"], res[f"decode_b{b}_tokens"] = rate, r["tokens"]
            if b == 1:
                per_round.append(rates)
    out[first]["decode_b1_share_adjacent"] = shares
    out[first]["decode_b1_rounds"] = per_round
    return out


# --- bounds -------------------------------------------------------------------------------------
def lm_bytes_per_token(llm) -> int:
    """Bytes of LM weights one decode step reads: all decoder layers (every tensor, so a
    quantized layout counts as stored) + the LM head (the embedding matrix when tied)."""
    total = 0
    for t in list(llm.model.model.layers.parameters()) + list(llm.model.model.layers.buffers()):
        total += t.numel() * t.element_size()
    for t in list(llm.model.lm_head.parameters()) + list(llm.model.lm_head.buffers()):
        total += t.numel() * t.element_size()
    return total


def vit_flops(family: str, shape: str, grid: tuple[int, int, int]) -> float:
    """Linear FLOPs (2 * weights * rows) plus attention FLOPs (4 * seq^2 * width per layer;
    Qwen2.5-VL's windowed blocks attend within 8x8-patch windows)."""
    v = SHAPES[shape][family]["vision"]
    out_hidden = SHAPES[shape][family]["hidden"]
    t, h, w = grid
    patches = t * h * w
    e = v["width"]
    if family == "qwen2_vl":
        block = 4 * e * e + 2 * e * e * v["mlp_ratio"]
    else:
        block = 4 * e * e + 3 * e * v["intermediate"]
    flops = 2 * (3 * 2 * 14 * 14 * e) * patches  # patch embedding
    flops += 2 * block * patches * v["depth"]
    flops += 2 * (16 * e * e + 4 * e * out_hidden) * patches / 4  # merger
    full = t * (h * w) ** 2  # attention within each frame
    if family == "qwen2_vl":
        flops += 4 * full * e * v["depth"]
    else:
        # windows of 4x4 merged units = 8x8 patches, cut from the top-left (edge windows smaller)
        mh, mw = h // 2, w // 2
        rows = [min(4, mh - i) for i in range(0, mh, 4)]
        cols = [min(4, mw - j) for j in range(0, mw, 4)]
        windowed = t * sum((a * b * 4) ** 2 for a in rows for b in cols)
        n_full = len(v["fullatt"])
        flops += 4 * e * (full * n_full + windowed * (v["depth"] - n_full))
    return float(flops)


# --- greedy agreement (fp32) --------------------------------------------------------------------
def check_greedy(path: Path, family: str, n: int, max_pixels: int | None) -> bool:
    """Both frameworks in float32 on the same prompts: same greedy tokens (and ViT outputs)?"""
    llm = load_qwenvl(path, "float32", None, max_pixels)
    inputs = build_inputs(llm)
    ids = [p.token_ids for p in inputs.decode]
    q_text = qwenvl_run(llm, inputs.decode, n)["tokens"]
    q_conc = qwenvl_generate(llm, inputs.concurrent, n)[1]
    q_image = qwenvl_run(llm, [inputs.image], n)["tokens"]
    q_vit = qwenvl_vit(llm, inputs.image.images[0]).float()
    del llm
    gc.collect()
    model = load_hf(path, family, "float32")
    h_text = hf_run(model, hf_batch(ids), n)["tokens"]
    h_conc = hf_run(model, hf_batch(inputs.concurrent_ids), n)["tokens"]
    h_image = hf_run(model, hf_image_inputs(inputs.image), n)["tokens"]
    h_vit = hf_vit(model, inputs.image.images[0]).float()
    del model
    gc.collect()
    agree = q_text == h_text and q_conc == h_conc and q_image == h_image
    diff = (q_vit - h_vit).abs().max().item()
    log(f"  [{family}] float32, {n} tokens, 4 + 8 + 1 (image) prompts: "
        f"greedy tokens agree: {'yes' if agree else 'no'}; ViT max |diff| {diff:.2e}")  # fmt: skip
    if not agree:
        for name, a, b in (("batch 4", q_text, h_text), ("8 concurrent", q_conc, h_conc),
                           ("image", q_image, h_image)):  # fmt: skip
            if a != b:
                log(f"    {name}: qwenvl {a}\n    {name}: transformers {b}")
    return agree


# --- report -------------------------------------------------------------------------------------
ROWS = [
    # key, label, unit, higher is better
    ("decode_b1_tok_s", "decode batch 1", "tok/s", True),
    ("decode_b4_tok_s", "decode batch 4", "tok/s", True),
    ("concurrent8_tok_s", "8 concurrent (aggregate)", "tok/s", True),
    ("ttft_text512_s", "TTFT 512-token text", "s", False),
    ("ttft_image_s", "TTFT 1280x720 image", "s", False),
    ("vit_s", "ViT alone (1280x720)", "s", False),
]


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def report(results: dict[str, Any]) -> None:
    log("")
    head = ("family", "measurement", "unit", "qwenvl", "transformers", "speedup", "bound",
            "qwenvl/bound")  # fmt: skip
    rows = [head]
    for family, fam in results["families"].items():
        q, h, b = fam.get("qwenvl", {}), fam.get("transformers", {}), fam.get("bounds", {})
        for key, label, unit, higher in ROWS:
            qv, hv = q.get(key), h.get(key)
            if qv is None and hv is None:
                continue
            speedup = None
            if qv and hv:
                speedup = qv / hv if higher else hv / qv
            bound = share = None
            if key == "decode_b1_tok_s" and "decode_b1_tok_s" in b:
                bound = b["decode_b1_tok_s"]
                share = qv / bound if qv else None
            if key == "vit_s" and "vit_s" in b:
                bound = b["vit_s"]
                share = bound / qv if qv else None
            rows.append((family, label, unit, fmt(qv), fmt(hv),
                         "-" if speedup is None else f"{speedup:.2f}x", fmt(bound),
                         "-" if share is None else f"{100 * share:.0f}%"))  # fmt: skip
        if "preprocess_s" in q:
            rows.append((family, "image preprocessing (qwenvl)", "s", fmt(q["preprocess_s"]),
                         "-", "-", "-", "-"))  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for k, r in enumerate(rows):
        log(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            log("-+-".join("-" * w for w in widths))
    log("speedup = how many times faster qwenvl is (tok/s: qwenvl/transformers; "
        "seconds: transformers/qwenvl).")  # fmt: skip
    log(
        "bound: decode b1 = DRAM bandwidth / LM bytes read per token (tok/s); ViT = FLOPs / "
        "GEMM peak of the qwenvl dtype (s). qwenvl/bound = share of it reached."
    )
    quant = results["settings"].get("quantization")
    for family, fam in results["families"].items():
        q = fam.get("qwenvl", {})
        shares = q.get("decode_b1_share_adjacent")
        if shares:
            log(f"{family}: decode batch 1 against the bandwidth read around each run (rounds): "
                f"{', '.join(f'{100 * s:.0f}%' for s in shares)}")  # fmt: skip
        for other in ("transformers", UNQUANTIZED):
            per = [r["qwenvl"] / r[other] for r in q.get("decode_b1_rounds", []) if other in r]
            if per:
                log(f"{family}: decode batch 1 qwenvl / {other} within each round: "
                    f"{', '.join(f'{p:.2f}x' for p in per)}")  # fmt: skip
        u = fam.get(UNQUANTIZED, {})
        if u and q.get("decode_b1_tok_s"):
            for b in (1, 4):
                qv, uv = q[f"decode_b{b}_tok_s"], u[f"decode_b{b}_tok_s"]
                log(f"{family}: decode batch {b} {quant} {qv:.2f} tok/s vs unquantized "
                    f"{uv:.2f}: {qv / uv:.2f}x (best round of each)")  # fmt: skip


# --- main ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tmp = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    ap.add_argument("--cache", type=Path, default=tmp / "qwenvl-bench")
    ap.add_argument("--families", default="qwen2_vl,qwen2_5_vl")
    ap.add_argument("--shape", choices=("full", "small"), default="full")
    ap.add_argument("--only", default="decode,ttft,image,vit,concurrent")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", help="qwenvl dtype")
    ap.add_argument("--hf-dtype", default="bfloat16", help="transformers dtype")
    ap.add_argument("--quantization", default=None, help="passed to LLM(quantization=...)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument(
        "--decode-tokens",
        type=int,
        default=None,
        help="new tokens per decode measurement; default 32 (full) or 16 (small)",
    )
    ap.add_argument(
        "--max-pixels",
        type=int,
        default=12845056,
        help="qwenvl image pixel limit (default: the released preprocessor's, which "
        "keeps 1280x720 at 1288x728; 0 = qwenvl's own default, capped on CPU)",
    )
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed runs per measurement after the warm-up (best kept); "
                         "default 1")  # fmt: skip
    ap.add_argument(
        "--no-vit-warmup",
        action="store_true",
        help="time the first ViT pass (a compute-bound pass of minutes, e.g. transformers in "
        "bf16 on a CPU without bf16 units, gains nothing from a warm-up)",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="float32 greedy agreement check (always on with --shape small)",
    )
    ap.add_argument("--out", type=Path, default=None, help="write all numbers to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeat is None:
        args.repeat = 1
    if args.decode_tokens is None:
        args.decode_tokens = 16 if args.shape == "small" else 32
    if not args.max_pixels:
        args.max_pixels = None
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    only = {o.strip() for o in args.only.split(",") if o.strip()}
    for f in families:
        if f not in FAMILIES:
            ap.error(f"unknown family {f!r} (choose from {', '.join(FAMILIES)})")
    unknown = only - {"decode", "ttft", "image", "vit", "concurrent"}
    if unknown:
        ap.error(f"unknown --only entries: {', '.join(sorted(unknown))}")
    if args.decode_tokens < 2:
        ap.error("--decode-tokens must be at least 2")

    hf_version = None
    if not args.skip_transformers:
        import transformers

        hf_version = transformers.__version__
        transformers.utils.logging.disable_progress_bar()
    log(f"torch {torch.__version__}, transformers {hf_version}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, shape {args.shape}, qwenvl {args.dtype}, "
        f"transformers {args.hf_dtype}")  # fmt: skip
    results: dict[str, Any] = {
        "settings": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "threads_used": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": hf_version,
        },  # fmt: skip
        "families": {},
    }
    machine = measure_machine(*((3, 0.5) if args.shape == "small" else (5, 2.0)))
    results["machine"] = machine
    peak_name = "bfloat16" if args.dtype in ("bfloat16", "bf16") else "float32"

    for family in families:
        log(f"\n== {family} ({RELEASED[family]} shape: {args.shape}) ==")
        path = build_checkpoint(args.cache, family, args.shape)
        fam: dict[str, Any] = {"checkpoint": str(path)}
        results["families"][family] = fam
        if not args.skip_transformers and (args.check or args.shape == "small"):
            fam["greedy_agree_fp32"] = check_greedy(
                path, family, min(args.decode_tokens, 16), args.max_pixels
            )

        t0 = time.perf_counter()
        llm = load_qwenvl(path, args.dtype, args.quantization, args.max_pixels)
        log(f"  qwenvl loaded in {time.perf_counter() - t0:.1f} s")
        inputs = build_inputs(llm)
        bytes_tok = lm_bytes_per_token(llm)
        rest, rounds = only, None
        entries: dict[str, tuple[str, Any]] = {"qwenvl": ("qwenvl", llm)}
        if "decode" in only:  # the models decode side by side, in rounds
            if not args.skip_transformers:
                entries["transformers"] = ("transformers", load_hf(path, family, args.hf_dtype))
            if args.quantization:
                entries[UNQUANTIZED] = (
                    "qwenvl", load_qwenvl(path, args.dtype, None, args.max_pixels)
                )  # fmt: skip
        if len(entries) > 1:
            rounds = decode_rounds(entries, inputs, args, machine, bytes_tok)
            entries.clear()
            gc.collect()
            rest = only - {"decode"}
            if UNQUANTIZED in rounds:
                fam[UNQUANTIZED] = rounds[UNQUANTIZED]
        q = measure("qwenvl", llm, inputs, args, rest)
        if rounds:
            q.update(rounds["qwenvl"])
        q["preprocess_s"] = inputs.preprocess_s
        fam["qwenvl"] = q
        grid = inputs.image.images[0].grid_thw
        flops = vit_flops(family, args.shape, grid)
        del llm
        gc.collect()
        remeasure_bandwidth(machine)

        if not args.skip_transformers:
            h = fam["transformers"] = rounds.get("transformers", {}) if rounds else {}
            if rest:
                t0 = time.perf_counter()
                model = load_hf(path, family, args.hf_dtype)
                log(f"  transformers loaded in {time.perf_counter() - t0:.1f} s")
                h.update(measure("transformers", model, inputs, args, rest))
                del model
                gc.collect()
                remeasure_bandwidth(machine)
            if "decode_b1_tokens" in q and "decode_b1_tokens" in h:
                same = q["decode_b1_tokens"] == h["decode_b1_tokens"]
                log(f"  decode batch 1 greedy tokens identical ({args.dtype} vs "
                    f"{args.hf_dtype}): {'yes' if same else 'no'}")  # fmt: skip
        fam["bounds"] = {
            "lm_bytes_per_token": bytes_tok,
            "decode_b1_tok_s": machine["dram_read_GBps"] * 1e9 / bytes_tok,
            "vit_flops": flops,
            "vit_grid": list(grid),
            "vit_s": flops / (machine[f"{peak_name}_gemm_GFLOPs"] * 1e9),
            "vit_s_at_float32_peak": flops / (machine["float32_gemm_GFLOPs"] * 1e9),
            "vit_s_at_bfloat16_peak": flops / (machine["bfloat16_gemm_GFLOPs"] * 1e9),
        }
        b = fam["bounds"]
        log(
            f"  bounds: decode b1 {b['decode_b1_tok_s']:.2f} tok/s ({bytes_tok / 1e9:.3f} GB of "
            f"LM weights per token); ViT {flops / 1e12:.3f} TFLOP -> {b['vit_s']:.3f} s at the "
            f"{peak_name} GEMM peak ({b['vit_s_at_float32_peak']:.3f} s at the float32 one)"
        )
        del inputs
        gc.collect()

    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
