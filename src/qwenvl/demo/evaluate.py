"""Held-out evaluation of the demo model (the ``qwenvl eval-demo`` command runs it).

Scenes come from a seed the training never uses (training streams are keyed by stage name and
step). Per task: (a) per-block accuracy (colour and number right at the same reading position)
and whole-answer exact match; (b), (c), (e) accuracy; (d) the share of answers whose box, mapped
back to the original image by the grounding API, has IoU >= 0.5 with the truth; (f) the share
within one second; (g) the share of tool calls whose click, mapped back to the original image by
``qwenvl.agents``, lands inside the named block, and, given the right call and a tool's result,
the share of replies that are the exact confirmation naming that block.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from qwenvl.agents import Click, parse_actions
from qwenvl.demo.tasks import (
    TASKS,
    TOOL_RESULTS,
    DemoSample,
    click_confirmation,
    demo_screen,
    parse_int,
    parse_list,
    sample_at,
)
from qwenvl.errors import ActionError
from qwenvl.sampling import SamplingParams

EVAL_SEED = 987654321


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score(sample: DemoSample, text: str, output: Any = None) -> dict[str, float]:
    """Metrics of one answer; ``output`` (the RequestOutput) is needed for grounding."""
    if sample.task == "list":
        truth = [(b.colour, b.number) for b in sample.info["scene"].blocks]
        got = parse_list(text)
        hits = sum(g == t for g, t in zip(got, truth))
        return {"block_acc": hits / len(truth), "exact": float(text.strip() == sample.answer)}
    if sample.task == "ground":
        objects = output.grounding() if output is not None else []
        if not objects:
            return {"iou50": 0.0}
        o = objects[0]
        truth = sample.info["scene"].by_number(sample.info["number"]).box
        return {"iou50": float(iou((o.x1, o.y1, o.x2, o.y2), truth) >= 0.5)}
    if sample.task == "when":
        got = parse_int(text)
        return {"within_1s": float(got is not None and abs(got - sample.info["second"]) <= 1)}
    if sample.task == "click":
        return {"inside": float(click_inside(sample, text))}
    return {"acc": float(text.strip() == sample.answer)}


def click_inside(sample: DemoSample, text: str) -> bool:
    """Whether the reply is one left click that lands inside the named block (scene pixels)."""
    scene = sample.info["scene"]
    try:
        actions = parse_actions(text, demo_screen(scene.width, scene.height))
    except ActionError:
        return False
    a = actions[0]
    if len(actions) != 1 or a != Click(a.x, a.y) or a.x is None or a.y is None:
        return False  # one plain left click, at a place
    x1, y1, x2, y2 = scene.by_number(sample.info["number"]).box
    return x1 <= a.x < x2 and y1 <= a.y < y2


def evaluate(
    llm: Any,
    count: int = 300,
    seed: int = EVAL_SEED,
    tasks: Sequence[str] = TASKS,
    batch: int = 48,
) -> dict[str, dict[str, float]]:
    """Mean metrics per task over ``count`` samples of every task."""
    params = SamplingParams(temperature=0, max_tokens=128)
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    samples = [sample_at(seed, i, [t]) for t in tasks for i in range(count)]
    for start in range(0, len(samples), batch):
        part = samples[start : start + batch]
        outs = llm.chat([s.messages(with_answer=False) for s in part], params)
        for s, o in zip(part, outs):
            for k, v in score(s, o.outputs[0].text, o).items():
                sums[s.task][k] += v
            counts[s.task] += 1
    clicks = [(i, s) for i, s in enumerate(samples) if s.task == "click"]
    for start in range(0, len(clicks), batch):
        part = clicks[start : start + batch]
        outs = llm.chat([confirmation_chat(s, i) for i, s in part], params)
        for (_, s), o in zip(part, outs):
            right = o.outputs[0].text.strip() == click_confirmation(s.info["number"])
            sums["click"]["confirm"] += float(right)
    return {t: {k: v / counts[t] for k, v in m.items()} for t, m in sums.items()}


def confirmation_chat(sample: DemoSample, index: int) -> list[dict[str, Any]]:
    """A click sample's second turn: its right tool call, then one of the tool results (by
    ``index``), for the model to confirm."""
    x, y = sample.call["arguments"]["coordinate"]
    result = TOOL_RESULTS[index % len(TOOL_RESULTS)].format(x=x, y=y)
    return replace(sample, follow_up=[{"role": "tool", "content": result}]).messages()


METRIC_NAMES = {
    "block_acc": "per-block accuracy",
    "exact": "exact match",
    "acc": "accuracy",
    "iou50": "IoU >= 0.5",
    "within_1s": "within 1 s",
    "inside": "click inside the block",
    "confirm": "confirmation names the block",
}


def format_table(result: dict[str, dict[str, float]], count: int) -> str:
    """A Markdown table of the per-task metrics (the README's form)."""
    lines = [f"| task ({count} each) | metric | value |", "|---|---|---|"]
    for task, metrics in result.items():
        for k, v in metrics.items():
            lines.append(f"| {task} | {METRIC_NAMES.get(k, k)} | {100 * v:.1f} % |")
    return "\n".join(lines)
