"""A new task for the demo model, learned with ``qwenvl train``: the top block's colour, in French.

The shipped demo model (``qwenvl/data/demo-model``) reads coloured numbered blocks and answers in
English; it has never seen French. This script writes a task it cannot do yet and trains it the
way a user would, through the ``qwenvl train`` command line, then scores greedy answers with the
engine (``qwenvl.LLM``) on held-out scenes drawn from another seed:

* ``data``: 1,200 training scenes (seed 1) and 200 held-out (seed 2), each a pyramid whose top
  row is one block; question "What color is the top box? Answer in French.", answer ``rouge``,
  ``bleu``... The DPO files pair that answer (chosen) with the French name of another colour
  (rejected: a colour of another block of the scene when there is one, else any other).
* ``full`` / ``full3``: full fine-tuning for 2 / 3 epochs (``full-more``: one more epoch on top
  of ``full``); ``lora`` / ``lora3``: a LoRA adapter on the language model (the default targets)
  for 40 steps / 3 epochs, served unmerged by ``LLM(lora=...)``;
* ``start`` then ``dpo`` / ``dpo-sft``: DPO alone and DPO with ``--dpo-sft-weight``, from the
  same half-trained starting point (one epoch of SFT), with the same steps; the held-out reward
  margin is the run's ``eval_margin`` (beta x the chosen-minus-rejected log-ratio to the frozen
  start, per pair).

    python bench/finetune_french.py --out /tmp/french            # everything, JSON at the end
    python bench/finetune_french.py --out /tmp/french --only full lora

Each stage writes ``OUT/<stage>/`` (metrics.jsonl, loss.png, final) and its figures to
``OUT/results.json``. Numbers measured on the 2-core CPU box are in the README's Fine-tuning
section.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qwenvl.demo import default_model_path
from qwenvl.demo.scenes import COLOUR_NAMES, Scene, random_scene, render

QUESTION = "What color is the top box? Answer in French."
FRENCH = {
    "red": "rouge",
    "orange": "orange",
    "yellow": "jaune",
    "green": "vert",
    "blue": "bleu",
    "purple": "violet",
    "pink": "rose",
    "brown": "marron",
}
TRAIN_SEED, HELDOUT_SEED = 1, 2
COMMON = ["--batch-size", "16", "--seed", "0", "--log-every", "10"]  # a later --batch-size wins
# stage -> (start from, method, extra options)
STAGES: dict[str, tuple[str, str, list[str]]] = {
    "full": ("demo", "sft", ["--lr", "1e-3", "--epochs", "2", "--batch-size", "8",
                             "--warmup-steps", "10"]),
    "full3": ("demo", "sft", ["--lr", "1e-3", "--epochs", "3", "--batch-size", "8",
                              "--warmup-steps", "10"]),
    "lora3": ("demo", "sft", ["--lora", "--lora-rank", "16", "--lora-alpha", "32", "--lr", "3e-3",
                              "--epochs", "3", "--warmup-steps", "5"]),
    "full-more": ("full", "sft", ["--lr", "3e-4", "--epochs", "1", "--warmup-steps", "5"]),
    "start": ("demo", "sft", ["--lr", "1e-3", "--epochs", "1", "--warmup-steps", "5"]),
    "dpo-sft": ("start", "dpo", ["--lr", "5e-4", "--max-steps", "12", "--dpo-beta", "0.1",
                                 "--dpo-sft-weight", "1.0"]),
    "dpo": ("start", "dpo", ["--lr", "5e-4", "--max-steps", "12", "--dpo-beta", "0.1"]),
    "lora": ("demo", "sft", ["--lora", "--lora-rank", "16", "--lora-alpha", "32", "--lr", "3e-3",
                             "--max-steps", "40", "--warmup-steps", "5"]),
}  # fmt: skip


def top_scene(rng: random.Random) -> Scene:
    """A random scene whose top row is a single block (so "the top box" is one block)."""
    while True:
        scene = random_scene(rng)
        if len(scene.rows[0]) == 1:
            return scene


def wrong_colour(scene: Scene, rng: random.Random) -> str:
    right = scene.blocks[0].colour
    others = sorted({b.colour for b in scene.blocks} - {right})
    return rng.choice(others or [c for c in COLOUR_NAMES if c != right])


def write_split(folder: Path, name: str, count: int, seed: int) -> None:
    """``name.jsonl`` (SFT) and ``name_dpo.jsonl`` with the images under ``folder/name/``."""
    rng = random.Random(seed)
    (folder / name).mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.jsonl", "w") as sft, open(folder / f"{name}_dpo.jsonl", "w") as dpo:
        for i in range(count):
            scene = top_scene(rng)
            image = f"{name}/{i:05d}.png"
            render(scene).save(folder / image)
            content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]
            prompt = [{"role": "user", "content": content}]
            answer = FRENCH[scene.blocks[0].colour]
            sft.write(json.dumps({"messages": [*prompt, {"role": "assistant", "content": answer}]}))
            pair = {"chosen": answer, "rejected": FRENCH[wrong_colour(scene, rng)]}
            dpo.write(json.dumps({"messages": prompt, **pair}) + "\n")
            sft.write("\n")


def greedy_accuracy(model: Path, data: Path, lora: Path | None = None) -> float:
    """Share of held-out questions answered exactly (greedy) by the engine."""
    from qwenvl import LLM, SamplingParams

    llm = LLM(str(model), dtype="float32", lora=str(lora) if lora else None)
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    prompts = []
    for line in lines:
        user = json.loads(json.dumps(line["messages"][0]))
        user["content"][0]["image"] = str(data.parent / user["content"][0]["image"])
        prompts.append([user])
    outs = llm.chat(prompts, SamplingParams(temperature=0, max_tokens=8))
    hits = [o.outputs[0].text.strip() == x["messages"][1]["content"] for o, x in zip(outs, lines)]
    return sum(hits) / len(hits)


def train_stage(out: Path, stage: str) -> dict[str, Any]:
    start, method, extra = STAGES[stage]
    model = default_model_path() if start == "demo" else out / start / "final"
    data = out / "data" / ("train_dpo.jsonl" if method == "dpo" else "train.jsonl")
    held = out / "data" / ("heldout_dpo.jsonl" if method == "dpo" else "heldout.jsonl")
    cmd = [sys.executable, "-m", "qwenvl", "train", "--model", str(model), "--data", str(data),
           "--eval-data", str(held), "--output", str(out / stage), "--method", method,
           *COMMON, *extra]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)  # progress lines: stderr is whatever this script's is
    seconds = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]
    last_eval = [m for m in metrics if "eval_loss" in m][-1]
    final = out / stage / "final"
    lora = final if "--lora" in extra else None
    base = model if lora else final
    result = {
        "stage": stage,
        "command": " ".join(cmd[1:]),
        "steps": max(m["step"] for m in metrics),
        "train_seconds": round(seconds, 1),
        "eval_loss": last_eval["eval_loss"],
        "heldout_greedy_accuracy": greedy_accuracy(base, out / "data" / "heldout.jsonl", lora),
    }
    if "eval_margin" in last_eval:
        result["heldout_reward_margin"] = last_eval["eval_margin"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder")
    ap.add_argument("--train", type=int, default=1200, help="training samples (default 1200)")
    ap.add_argument("--heldout", type=int, default=200, help="held-out samples (default 200)")
    ap.add_argument("--only", nargs="*", default=list(STAGES), help="stages (default: all)")
    ap.add_argument("--skip-done", action="store_true", help="skip stages in results.json")
    args = ap.parse_args()
    data = args.out / "data"
    if not (data / "heldout.jsonl").is_file():
        write_split(data, "train", args.train, TRAIN_SEED)
        write_split(data, "heldout", args.heldout, HELDOUT_SEED)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if "demo" not in results:
        acc = greedy_accuracy(default_model_path(), data / "heldout.jsonl")
        results["demo"] = {"stage": "demo", "heldout_greedy_accuracy": acc}
    for stage in args.only:
        if args.skip_done and stage in results:
            continue
        results[stage] = train_stage(args.out, stage)
        path.write_text(json.dumps(results, indent=2))
        print(json.dumps(results[stage]), flush=True)
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
