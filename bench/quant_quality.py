"""Logit error and argmax agreement of the CPU weight-only quantizations against the bf16 weights.

    PYTHONPATH=src python bench/quant_quality.py --ckpt CK [--modes int8 int4] [--prompts 2]
        [--tokens 256] [--paths prefill decode] [--greedy 16] [--json OUT.json]
    PYTHONPATH=src python bench/quant_quality.py          # builds the random 2B checkpoint first
    PYTHONPATH=src python bench/quant_quality.py --shape small --tokens 64   # a quick run

The reference is the CPU default ``LLM(ck)`` of a 16-bit checkpoint: bf16 weights (packed) under
float32 activations. Each ``--modes`` entry is ``LLM(ck, quantization=mode)`` on the same
checkpoint (``int4-head-int8`` / ``int4-head-int4``: int4 with ``head_quantization`` int8 / int4,
the LM head quantised too; int4 alone keeps it bf16, int8 quantises it to int8). Without
``--ckpt`` the checkpoint is random weights of the exact Qwen2-VL-2B-Instruct shape (``--shape
full``; ``small`` = same structure, tiny widths) in the released layout, built by
``bench/released_shapes.py`` into ``--cache`` (4.4 GB, reused by later runs).

Teacher-forced: ``--prompts`` text prompts of ``--tokens`` tokens each (sentences of the bench
corpus in a seeded order, cut at ``--tokens``) go through every model, the same token ids, and the
logits at every position are compared with the reference's:

* ``max_rel``: max |logit - ref| over all positions and the vocabulary / max |ref|;
* ``mean_abs``: mean |logit - ref|, and ``mean_rel`` = that / mean |ref| (README's int8 form);
* ``argmax``: positions whose argmax equals the reference's (count and share);
* ``kl``: mean KL(softmax(ref) || softmax(logit)) a position, nats;
* the reference's median top-1 minus top-2 logit gap (random weights give near-flat
  next-token distributions, so small errors flip the argmax).

Two paths (``--paths``): ``prefill`` runs each prompt as one forward, where the quantised linears
expand their weights to float32 for torch's GEMM (the weight rounding alone); ``decode`` splits
every linear's input into chunks of at most 16 rows, so each goes through the decode GEMV kernels
(``kernels.linear_int8`` / ``linear_int4`` / ``linear_bf16``: also the activation rounding they
do) as a decode step computes it. The reference is always the bf16 model in its prefill path
(its bf16 weights widened exactly); in the decode path ``bf16`` itself is measured too (the
kernels' own summation error). ``--greedy N`` also decodes N greedy tokens after each prompt
through the engine and reports where each mode's tokens first differ from the reference's.

Weight error (``--weight-layers``, first): ``||W' - W|| / ||W||`` of each linear of a few decoder
layers and of the head, quantised from the checkpoint's tensors by the same calls the load makes.

Control (``rtn4-torch``, on unless ``--no-control``): after its own measurements the reference
model's decoder weights are fake-quantised in place by a plain round-to-nearest 4-bit in torch
(min/max per group of 128, no refit; written here, independent of the kernels) and measured in the
prefill path: the error any plain 4-bit rounding of these weights gives, to read int4's beside.

One model is in memory at a time (the reference logits are kept: prompts x tokens x vocab fp32);
each is deleted and garbage-collected before the next loads. Load seconds and RSS are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from released_shapes import CORPUS, build_checkpoint  # bench/released_shapes.py

from qwenvl import LLM, SamplingParams, kernels
from qwenvl.engine.config import EngineConfig
from qwenvl.layers.int4_linear import Int4Linear
from qwenvl.layers.packed_linear import KERNEL_MAX_ROWS, PackedLinear


def log(msg: str) -> None:
    print(msg, flush=True)


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


MODES = ("int8", "int4", "int4-head-int8", "int4-head-int4")


def load(ck: Path, mode: str | None) -> tuple[LLM, float]:
    """``LLM(ck)`` (mode None), ``quantization=mode``, or for ``int4-head-X`` int4 with
    ``head_quantization=X`` (the LM head quantised too; qwenvl versions that have it)."""
    engine = EngineConfig(
        enable_prefix_caching=False, encoder_cache_memory=0, kv_cache_memory=256 << 20
    )
    kwargs: dict[str, Any] = {"quantization": mode}
    if mode is not None and mode.startswith("int4-head-"):
        if "head_quantization" not in inspect.signature(LLM.__init__).parameters:
            raise SystemExit(f"{mode}: this qwenvl's LLM() takes no head_quantization")
        kwargs = {"quantization": "int4", "head_quantization": mode.removeprefix("int4-head-")}
    t0 = time.perf_counter()
    llm = LLM(ck, engine_config=engine, **kwargs)
    return llm, time.perf_counter() - t0


def describe(llm: LLM) -> str:
    """The weight format and the module types of the first decoder layer's linears and head."""
    layer = llm.model.model.layers[0]
    parts = []
    for name, m in layer.named_modules():
        if name.endswith("_proj") and not list(m.children()):
            parts.append(f"{name.split('.')[-1]}={kind(m)}")
    return (
        f"weight_format={llm.weight_format} activations={llm.model.dtype} "
        f"backend={llm.engine.runner.backend.name}; layer 0: {', '.join(parts)}; "
        f"head={kind(llm.model.lm_head)}"
    )


def kind(m: torch.nn.Module) -> str:
    extra = getattr(m, "mode", None) or (f"g{m.group_size}" if isinstance(m, Int4Linear) else None)
    return type(m).__name__ + (f"[{extra}]" if extra else "")


def make_prompts(llm: LLM, n: int, tokens: int, seed: int) -> list[tuple[str, list[int]]]:
    """``n`` prompts of ``tokens`` tokens (fewer only if the corpus runs out): (text, ids), where
    ids is the encoding of text (text = the decoded cut, so both paths see the same tokens)."""
    tok = llm.tokenizer
    out = []
    for k in range(n):
        rng = random.Random(seed + k)
        sentences = list(CORPUS)
        rng.shuffle(sentences)
        ids = tok.encode(" ".join(sentences))[:tokens]
        text = tok.decode(ids)
        out.append((text, tok.encode(text)))
    return out


@contextlib.contextmanager
def decode_kernels():
    """Every PackedLinear / Int4Linear call runs in row chunks of <= KERNEL_MAX_ROWS, i.e. through
    the decode GEMV kernels (each row is computed independently, so chunking changes nothing
    else)."""
    saved = {cls: cls.mm for cls in (PackedLinear, Int4Linear)}

    def chunked(orig):
        def mm(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([orig(self, c) for c in x.split(KERNEL_MAX_ROWS)])

        return mm

    for cls, orig in saved.items():
        cls.mm = chunked(orig)
    try:
        yield
    finally:
        for cls, orig in saved.items():
            cls.mm = orig


@torch.inference_mode()
def prompt_logits(llm: LLM, ids: list[int], path: str) -> torch.Tensor:
    """float32 logits ``[L, vocab]`` at every position of one text prompt (one forward, no
    cache)."""
    p = llm.processor.prepare_text("", token_ids=ids)
    x = torch.tensor(p.token_ids)[None]
    positions = p.positions[:, None, :]
    ctx = decode_kernels() if path == "decode" else contextlib.nullcontext()
    with ctx:
        return llm.model(x, positions)[0].float()


class Stats:
    """Running comparison of one (mode, path) against the reference over all prompts."""

    def __init__(self) -> None:
        self.max_err = self.max_ref = self.sum_err = self.sum_ref = self.kl = 0.0
        self.n_elem = self.n_pos = self.agree = 0

    def add(self, q: torch.Tensor, ref: torch.Tensor) -> None:
        err = (q - ref).abs()
        self.max_err = max(self.max_err, float(err.max()))
        self.max_ref = max(self.max_ref, float(ref.abs().max()))
        self.sum_err += float(err.double().sum())
        self.sum_ref += float(ref.abs().double().sum())
        self.n_elem += err.numel()
        self.n_pos += ref.shape[0]
        self.agree += int((q.argmax(-1) == ref.argmax(-1)).sum())
        lp, lq = ref.log_softmax(-1), q.log_softmax(-1)
        self.kl += float((lp.exp() * (lp - lq)).sum(-1).double().sum())

    def result(self) -> dict[str, float]:
        return {
            "max_rel": self.max_err / self.max_ref,
            "max_abs": self.max_err,
            "mean_abs": self.sum_err / self.n_elem,
            "mean_rel": self.sum_err / self.sum_ref,
            "argmax_agree": self.agree,
            "positions": self.n_pos,
            "argmax_share": self.agree / self.n_pos,
            "kl": self.kl / self.n_pos,
        }


def rtn4(w: torch.Tensor, group: int) -> torch.Tensor:
    """Plain round-to-nearest asymmetric 4-bit of ``w [out, in]`` per row and group of ``group``
    columns (``scale = (max - min) / 15``, no refit), dequantised to float32."""
    rows = w.float().view(w.shape[0], -1, group)
    lo, hi = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)
    s = ((hi - lo) / 15).clamp_min(1e-12)
    return (torch.round((rows - lo) / s).clamp_(0, 15) * s + lo).view(w.shape)


@torch.inference_mode()
def weight_errors(ck: Path, layers: list[int], group: int) -> dict[str, dict[str, float]]:
    """Relative RMS error ``||W' - W|| / ||W||`` of each decoder linear of ``layers`` (and the
    tied embedding / head), read straight from the checkpoint and quantised by the same calls
    the load uses (int8: ``PackedLinear.from_dense``, per-row; int4: ``Int4Linear.from_dense``,
    group 128 with its refit) and by the plain torch round-to-nearest of the control. Per-row
    quantisation makes fusing q/k/v or gate/up irrelevant, so the separate tensors are used."""
    from safetensors import safe_open

    index = ck / "model.safetensors.index.json"
    where = (
        json.loads(index.read_text())["weight_map"]
        if index.exists()
        else dict.fromkeys(safe_open(ck / "model.safetensors", "pt").keys(), "model.safetensors")
    )
    names = [
        n
        for n in where
        if n.endswith("proj.weight")
        and n.startswith("model.layers.")
        and int(n.split(".")[2]) in layers
    ]
    head = "lm_head.weight" if "lm_head.weight" in where else "model.embed_tokens.weight"

    def int8(t: torch.Tensor) -> torch.Tensor:
        return PackedLinear.from_dense(t, None, "int8").dense_weight(torch.float32)

    def int4(t: torch.Tensor) -> torch.Tensor:
        return Int4Linear.from_dense(t, None, group).dense_weight(torch.float32)

    out: dict[str, dict[str, float]] = {}
    for name in [*names, head]:
        with safe_open(ck / where[name], "pt") as f:
            w = f.get_tensor(name)
        ref = w.float()
        norm = float(ref.norm())
        if name == head:  # int4 keeps the head in bf16 unless head_quantization asks
            modes = {"int8": int8, "int4-head-int4": int4}
        else:
            modes = {"int8": int8, "int4": int4, "rtn4-torch": lambda t: rtn4(t, group)}
        out[name] = {m: float((fn(w) - ref).norm()) / norm for m, fn in modes.items()}
        del w, ref
    return out


@torch.inference_mode()
def fake_quantize_int4(llm: LLM, group: int) -> int:
    """Replace the bf16 model's packed decoder weights by a plain round-to-nearest 4-bit copy,
    written here in torch independently of ``kernels.quantize_int4``: per row and group of
    ``group`` columns, ``scale = (max - min) / 15``, ``q = round((w - min) / scale)``, ``w = q *
    scale + min``, stored back in bf16 (0.4% rounding of each weight on top of the 4-bit error).
    The LM head stays as it is (int4 keeps it 16-bit too). Returns the number of layers."""
    n = 0
    for m in llm.model.model.layers.modules():
        if isinstance(m, PackedLinear) and m.mode == "bf16":
            w = m.weight
            for r in range(0, w.shape[0], 1024):
                w[r : r + 1024] = rtn4(w[r : r + 1024], group).to(w.dtype)
            n += 1
    return n


def greedy(llm: LLM, texts: list[str], n: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(texts, params)]


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (len if none)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--ckpt", type=Path, default=None, help="16-bit checkpoint folder")
    ap.add_argument("--family", default="qwen2_vl", choices=("qwen2_vl", "qwen2_5_vl"))
    ap.add_argument("--shape", default="full", choices=("full", "small"))
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "qwenvl-bench")
    ap.add_argument("--modes", nargs="+", default=["int8", "int4"], choices=MODES)
    ap.add_argument("--paths", nargs="+", default=["prefill", "decode"],
                    choices=("prefill", "decode"))  # fmt: skip
    ap.add_argument("--prompts", type=int, default=2, help="number of text prompts")
    ap.add_argument("--tokens", type=int, default=256, help="tokens a prompt")
    ap.add_argument("--seed", type=int, default=0, help="prompt order seed")
    ap.add_argument(
        "--greedy", type=int, default=16, help="greedy tokens after each prompt (0: none)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the rtn4-torch control (see the docstring)",
    )
    ap.add_argument(
        "--control-group",
        type=int,
        default=128,
        help="group size of the control and of the int4 weight-error check",
    )
    ap.add_argument(
        "--weight-layers",
        type=int,
        nargs="*",
        default=[0, 1, -1],
        help="decoder layers whose per-tensor weight error is reported (negative: from "
        "the end; none: skip)",
    )
    ap.add_argument("--weight-only", action="store_true", help="only the weight error")
    args = ap.parse_args(argv)
    if not kernels.available():
        log(f"note: CPU kernels not available ({kernels.describe()}); formats run on torch paths")
    torch.manual_seed(0)
    ck = args.ckpt or build_checkpoint(args.cache, args.family, args.shape)
    n_layers = json.loads((ck / "config.json").read_text())["num_hidden_layers"]
    args.weight_layers = sorted({k % n_layers for k in args.weight_layers})
    log(f"checkpoint {ck}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"kernels: {kernels.describe() if kernels.available() else 'unavailable'}")  # fmt: skip

    out: dict[str, Any] = {"checkpoint": str(ck), "args": vars(args) | {"ckpt": str(ck)}}
    out["args"]["cache"] = str(args.cache)
    out["args"]["json"] = str(args.json)
    out["models"], out["results"], out["greedy"] = {}, [], {}

    if args.weight_layers:
        t0 = time.perf_counter()
        we = out["weight_error"] = weight_errors(ck, args.weight_layers, args.control_group)
        log(f"weight error ||W' - W|| / ||W|| (layers {args.weight_layers} and the head, "
            f"{time.perf_counter() - t0:.0f} s):")  # fmt: skip
        kinds = sorted({n.split(".")[-2] for n in we})
        for kind in kinds:
            rows = [v for n, v in we.items() if n.split(".")[-2] == kind]
            means = {m: sum(r[m] for r in rows) / len(rows) for m in rows[0]}
            log(f"  {kind}: " + ", ".join(f"{m} {100 * v:.3g}%" for m, v in means.items()))
        if args.weight_only:
            if args.json:
                args.json.write_text(json.dumps(out, indent=1))
            return 0

    llm, secs = load(ck, None)
    log(f"bf16 reference: loaded in {secs:.1f} s, RSS {rss_gib():.2f} GiB; {describe(llm)}")
    out["models"]["bf16"] = {"load_s": secs, "rss_gib": rss_gib(), "layout": describe(llm)}
    prompts = make_prompts(llm, args.prompts, args.tokens, args.seed)
    log(f"{len(prompts)} prompts of {[len(ids) for _, ids in prompts]} tokens")
    out["prompt_tokens"] = [len(ids) for _, ids in prompts]
    t0 = time.perf_counter()
    refs = [prompt_logits(llm, ids, "prefill") for _, ids in prompts]
    log(f"  reference logits ({time.perf_counter() - t0:.1f} s); max |ref| "
        f"{max(float(r.abs().max()) for r in refs):.3f}, mean |ref| "
        f"{sum(float(r.abs().mean()) for r in refs) / len(refs):.4f}")  # fmt: skip
    top2 = torch.cat([r.topk(2, -1).values for r in refs])
    gap = float((top2[:, 0] - top2[:, 1]).median())
    out["ref_median_top12_gap"] = gap
    log(f"  reference median top-1 - top-2 logit gap {gap:.4f}")

    def measure(name: str, model: LLM, paths: list[str]) -> None:
        for path in paths:
            st = Stats()
            t = time.perf_counter()
            for (_, ids), ref in zip(prompts, refs):
                st.add(prompt_logits(model, ids, path), ref)
            r = st.result() | {"mode": name, "path": path}
            out["results"].append(r)
            log(f"  {name} {path}: max {100 * r['max_rel']:.3g}% of max|ref|, mean abs "
                f"{r['mean_abs']:.3g} ({100 * r['mean_rel']:.3g}% of mean|ref|), argmax "
                f"{r['argmax_agree']}/{r['positions']} ({100 * r['argmax_share']:.1f}%), KL "
                f"{r['kl']:.3g} ({time.perf_counter() - t:.1f} s)")  # fmt: skip

    if "decode" in args.paths:
        measure("bf16", llm, ["decode"])
    texts = [text for text, _ in prompts]
    if args.greedy:
        out["greedy"]["bf16"] = ref_tokens = greedy(llm, texts, args.greedy)
    if args.control and llm.weight_format == "bf16":
        n = fake_quantize_int4(llm, args.control_group)
        log(f"rtn4-torch control: {n} decoder linears of the bf16 model fake-quantised in torch "
            f"(round-to-nearest, min/max, group {args.control_group}), held in bf16")  # fmt: skip
        measure("rtn4-torch", llm, ["prefill"])
    del llm
    gc.collect()

    for mode in args.modes:
        llm, secs = load(ck, mode)
        log(f"{mode}: loaded in {secs:.1f} s, RSS {rss_gib():.2f} GiB; {describe(llm)}")
        out["models"][mode] = {"load_s": secs, "rss_gib": rss_gib(), "layout": describe(llm)}
        measure(mode, llm, args.paths)
        if args.greedy:
            toks = out["greedy"][mode] = greedy(llm, texts, args.greedy)
            same = [first_difference(a, b) for a, b in zip(ref_tokens, toks)]
            out["greedy"][f"{mode}_first_difference"] = same
            log(f"  {mode} greedy {args.greedy} tokens: first difference from bf16 at {same}")
        del llm
        gc.collect()

    log("\n| mode | path | max err / max abs logit | mean abs err | mean err / mean abs logit "
        "| argmax agreement | KL (nats) |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for r in out["results"]:
        log(f"| {r['mode']} | {r['path']} | {100 * r['max_rel']:.3g} % | {r['mean_abs']:.3g} | "
            f"{100 * r['mean_rel']:.3g} % | {r['argmax_agree']}/{r['positions']} "
            f"({100 * r['argmax_share']:.1f} %) | {r['kl']:.3g} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
