"""What structured outputs cost: decode with a JSON schema against without, on the CPU.

    PYTHONPATH=src python bench/structured.py                 # Qwen2-VL-2B shape, a few minutes
    PYTHONPATH=src python bench/structured.py --shape small   # smoke run

The bf16 random-weight checkpoint of ``released_shapes.py`` loaded with ``LLM(path)`` (bf16
packed decoder weights, float32 activations). At batch 1 and batch 8, ``--rounds`` alternating
rounds of greedy decoding of ``--tokens`` new tokens after a short prompt, free (``ignore_eos``)
and constrained to a JSON schema whose one string field must be long (so every constrained
sequence decodes all its tokens, as the free ones do); tok/s from the first token to the last
(``cpu_speed.qwenvl_run``) and the ratio constrained/free within each round. Then the pieces: the
llguidance tokenizer built from the 151k vocabulary (once per engine), a schema's first compile
and a cached one, and per step the mask of one sequence (``compute_masks``, overlapped with the
model step in the engine) and applying the masks of a batch to its logits (``apply_masks``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from cpu_speed import cut, qwenvl_run  # bench/
from released_shapes import CORPUS, FAMILIES, build_checkpoint, log  # bench/

LONG_TEXT = {
    "type": "object",
    "properties": {"answer": {"type": "string", "minLength": 2000, "maxLength": 4000}},
    "required": ["answer"],
    "additionalProperties": False,
}
# a realistic agent-action schema for the compile timing (nested, enum, anyOf, $ref)
ACTION = {
    "$defs": {"xy": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}},
    "type": "object",
    "properties": {
        "thought": {"type": "string", "maxLength": 200},
        "action": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"click": {"$ref": "#/$defs/xy"}},
                    "required": ["click"],
                },
                {
                    "type": "object",
                    "properties": {"type": {"type": "string"}},
                    "required": ["type"],
                },
                {
                    "type": "object",
                    "properties": {"key": {"enum": ["enter", "esc", "tab"]}},
                    "required": ["key"],
                },
            ]
        },
        "boxes": {
            "type": "array",
            "maxItems": 8,
            "items": {
                "type": "object",
                "properties": {
                    "bbox_2d": {
                        "type": "array",
                        "items": {"type": "integer"},
                        "minItems": 4,
                        "maxItems": 4,
                    },
                    "label": {"type": "string"},
                },
                "required": ["bbox_2d", "label"],
            },
        },
    },
    "required": ["thought", "action"],
}


def timed(fn, reps: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "qwenvl-bench")
    ap.add_argument("--family", choices=FAMILIES, default="qwen2_vl")
    ap.add_argument("--shape", choices=("full", "small"), default="full")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()

    from qwenvl import LLM
    from qwenvl.engine.grammar import apply_masks, compute_masks
    from qwenvl.structured import StructuredOutput

    path = build_checkpoint(args.cache, args.family, args.shape)
    llm = LLM(path)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {path.name}, "
        f"weights {llm.weight_format}")  # fmt: skip
    grammars = llm.engine.grammars
    t_tok = timed(lambda: grammars.llg_tokenizer)
    log(f"llguidance tokenizer from the {llm.tokenizer.vocab_size}-token vocabulary: "
        f"{t_tok:.2f} s (once per engine)")  # fmt: skip
    action = StructuredOutput(json_schema=ACTION)
    t_first = timed(lambda: grammars.matcher(action))
    t_cached = timed(lambda: grammars.matcher(action), reps=20)
    log(
        f"agent-action schema: first compile {t_first * 1e3:.1f} ms, cached {t_cached * 1e3:.3f} ms"
    )
    so = StructuredOutput(json_schema=LONG_TEXT)
    m = grammars.matcher(so)
    for tok in llm.tokenizer.encode('{"answer": "the', special=False):
        m.consume_token(tok)
    t_mask = timed(lambda: compute_masks([m]), reps=50)
    vocab = llm.model.config.text.vocab_size
    for b in (1, 8):
        logits = torch.randn(b, vocab)
        masks = compute_masks([m] * b)
        rows = list(range(b))
        t_apply = timed(lambda x=logits, r=rows, k=masks: apply_masks(x, r, k), reps=20)
        log(f"batch {b}: a mask {t_mask * 1e3:.2f} ms per sequence (on a thread during the step), "
            f"applying the batch's masks {t_apply * 1e3:.2f} ms")  # fmt: skip

    prompt = cut(llm.processor.prepare_text(" ".join(CORPUS)), 32)
    results: dict[int, list[tuple[float, float]]] = {}
    for b in (int(x) for x in args.batches.split(",")):
        qwenvl_run(llm, [prompt] * b, 4)  # warm-up
        qwenvl_run(llm, [prompt] * b, 4, structured=so)
        for r in range(args.rounds):
            free = qwenvl_run(llm, [prompt] * b, args.tokens)
            held = qwenvl_run(llm, [prompt] * b, args.tokens, structured=so)
            assert all(len(t) == args.tokens for t in held["tokens"]), (
                "a constrained sequence ended early"
            )
            rf = b * (args.tokens - 1) / free["decode_s"]
            rh = b * (args.tokens - 1) / held["decode_s"]
            results.setdefault(b, []).append((rf, rh))
            log(f"batch {b} round {r + 1}: free {rf:.2f} tok/s, JSON schema {rh:.2f} tok/s "
                f"({rh / rf:.3f}x)")  # fmt: skip
    log("\nbatch | free tok/s (rounds) | schema tok/s (rounds) | schema/free (median)")
    for b, rows in results.items():
        ratio = statistics.median(h / f for f, h in rows)
        free = ", ".join(f"{f:.2f}" for f, _ in rows)
        held = ", ".join(f"{h:.2f}" for _, h in rows)
        log(f"{b:5d} | {free} | {held} | {ratio:.3f}x")


if __name__ == "__main__":
    sys.exit(main())
