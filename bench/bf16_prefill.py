"""``prefill_dtype="bfloat16"`` against the exact float32 prefill, on the exact Qwen2-VL-2B shape
(random weights, ``released_shapes.py``): accuracy, then speed in alternating rounds.

    python bench/bf16_prefill.py [--rounds 2] [--out results.json]

Accuracy (one model, its decoder GEMMs switched between the two dtypes; the vision tower as
loaded, float32, against its copy with bf16 ``PackedLinear`` linears and bf16 attention):

* the 512-token prompt's logits at every position: max abs error over the largest logit, and how
  often the top token agrees;
* the vision features of the 1280x720 picture (4,784 patches): max abs error, and the cosine of
  each feature row with float32's (min and mean).

Speed: the 512-token prompt's time to the first token (the engine, as ``llama_cpp.py``'s ``ttft``
row) and the vision encoder on that picture, float32 and bf16 one after the other, the order
swapped every round. Random weights make logits nearly flat, so agreement here is a harder test
than on a trained model's peaked ones; the demo model's held-out accuracy is the other half of
the statement (``qwenvl eval-demo --pack-weights --prefill-dtype {float32,bfloat16}``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # scoring.py
sys.path.insert(0, str(Path(__file__).parent))

from cpu_speed import build_inputs, load_qwenvl, qwenvl_run, qwenvl_vit
from released_shapes import build_checkpoint

from qwenvl.layers.attention import set_attention_dtype
from qwenvl.layers.packed_linear import native_bf16, pack_linears, set_gemm_dtype
from scoring import prompt_logits  # tests/scoring.py: whole-prompt logits, no cache


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def logits(llm, prompt) -> torch.Tensor:
    """Logits at every position of a text prompt, no cache (the parity tests' helper)."""
    return prompt_logits(llm.model, [prompt])[0][0].float()


def use(llm, mode: str, vit32, vit16) -> None:
    """Switch the decoder's prefill GEMMs and the vision tower to ``mode``."""
    bf16 = mode == "bfloat16"
    set_gemm_dtype(llm.model, torch.bfloat16 if bf16 else torch.float32)
    llm.model.visual = vit16 if bf16 else vit32


def accuracy(llm, inputs, vit32, vit16) -> dict[str, Any]:
    image = inputs.image.images[0]
    use(llm, "float32", vit32, vit16)
    ref, f32 = logits(llm, inputs.long), qwenvl_vit(llm, image).float()
    use(llm, "bfloat16", vit32, vit16)
    got, f16 = logits(llm, inputs.long), qwenvl_vit(llm, image).float()
    cos = F.cosine_similarity(f16, f32, dim=-1)
    return {
        "logits_max_abs_err_rel": float((got - ref).abs().max() / ref.abs().max()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
        "positions": ref.shape[0],
        "vit_max_abs_err": float((f16 - f32).abs().max()),
        "vit_max_abs": float(f32.abs().max()),
        "vit_cos_min": float(cos.min()),
        "vit_cos_mean": float(cos.mean()),
        "vit_rows": f32.shape[0],
    }


def timed(llm, inputs, mode: str, vit32, vit16) -> dict[str, float]:
    use(llm, mode, vit32, vit16)
    load = os.getloadavg()[0]
    ttft = qwenvl_run(llm, [inputs.long], 1)["ttft"]
    t0 = time.perf_counter()
    qwenvl_vit(llm, inputs.image.images[0])
    return {"ttft": ttft, "vit": time.perf_counter() - t0, "load_before": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    ckpt = build_checkpoint(Path(tempfile.gettempdir()) / "qwenvl-bench", "qwen2_vl", "full")
    llm = load_qwenvl(ckpt, "auto", None, 12845056, prefill_dtype="float32")  # switched below
    if llm.weight_format != "bf16":
        raise SystemExit(f"expected bf16-packed decoder weights, got {llm.weight_format}")
    inputs = build_inputs(llm)
    vit32 = llm.model.visual
    vit16 = copy.deepcopy(vit32)
    pack_linears(vit16, torch.bfloat16)
    set_attention_dtype(vit16, torch.bfloat16)
    log(f"native bf16 dot products: {native_bf16()}; load average {os.getloadavg()}")
    result: dict[str, Any] = {
        "native_bf16": native_bf16(),
        "accuracy": accuracy(llm, inputs, vit32, vit16),
    }
    log(json.dumps(result["accuracy"], indent=1))
    qwenvl_run(llm, [inputs.decode[0]], 2)  # warm-up of both prefill paths
    rounds = []
    for r in range(a.rounds):
        order = ["float32", "bfloat16"] if r % 2 == 0 else ["bfloat16", "float32"]
        row = {m: timed(llm, inputs, m, vit32, vit16) for m in order}
        row["ttft_ratio"] = row["float32"]["ttft"] / row["bfloat16"]["ttft"]
        row["vit_ratio"] = row["float32"]["vit"] / row["bfloat16"]["vit"]
        log(f"round {r + 1}: " + json.dumps(row))
        rounds.append(row)
    result["rounds"] = rounds
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
