"""The loss curve as a PNG, drawn with Pillow (no plotting dependency).

Step 1's loss is often ten times the loss after a hundred steps, so on a linear axis from step 1
everything after the first drop is a flat line. The top panel is therefore on a log scale; under
it, SFT runs get the second half of the run on a linear axis of its own (is it still
improving, or over-fitting?), and DPO runs get the reward margin instead, the number DPO
optimises. Train values are lines, eval values dots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

W, PANEL_H, PAD = 800, 320, 60
TRAIN, EVAL = (31, 119, 180), (255, 127, 14)
Points = list[tuple[float, float]]


@dataclass
class Panel:
    title: str
    train: Points
    evals: Points
    log: bool = False


def series(metrics: Sequence[dict[str, Any]], key: str) -> Points:
    return [(m["step"], float(m[key])) for m in metrics if m.get(key) is not None]


def panels_for(metrics: Sequence[dict[str, Any]]) -> list[Panel]:
    """Loss on a log scale (linear if some value is not positive); then the DPO margin, or the
    SFT loss over the second half of the steps on a linear scale."""
    train, evals = series(metrics, "loss"), series(metrics, "eval_loss")
    positive = all(v > 0 for _, v in train + evals)
    title = "loss, log scale" if positive else "loss"
    panels = [Panel(f"{title} (blue: train, orange: eval)", train, evals, log=positive)]
    margin, eval_margin = series(metrics, "margin"), series(metrics, "eval_margin")
    if margin or eval_margin:
        panels.append(Panel("DPO reward margin (blue: train, orange: eval)", margin, eval_margin))
    elif len(train) >= 20:
        cut = train[len(train) // 2][0]
        late = [p for p in train if p[0] >= cut]
        panels.append(
            Panel(f"loss from step {cut:g}, linear", late, [p for p in evals if p[0] >= cut])
        )
    return panels


def plot_losses(metrics: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write the panels of :func:`panels_for` one under the other to ``path``."""
    panels = panels_for(metrics)
    image = Image.new("RGB", (W, PANEL_H * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    for i, panel in enumerate(panels):
        draw_panel(draw, panel, i * PANEL_H)
    image.save(path)
    return Path(path)


class Axes:
    """Step -> x pixel and value -> y pixel inside one panel's frame (log or linear y)."""

    def __init__(self, points: Points, top: int, log: bool) -> None:
        self.top, self.log = top, log
        xs = [p[0] for p in points] or [0.0]
        ys = [self.f(p[1]) for p in points] or [0.0]
        self.x0, self.x1 = min(xs), max(xs)
        self.y0, self.y1 = min(ys), max(ys)
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1
        if self.y1 <= self.y0:
            self.y0, self.y1 = self.y0 - 0.5, self.y1 + 0.5

    def f(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def xy(self, p: tuple[float, float]) -> tuple[float, float]:
        fx = (p[0] - self.x0) / (self.x1 - self.x0)
        fy = (self.f(p[1]) - self.y0) / (self.y1 - self.y0)
        return PAD + fx * (W - 1.5 * PAD), self.top + PANEL_H - PAD - fy * (PANEL_H - 1.5 * PAD)

    def ticks(self) -> list[float]:
        """Values to label: the ends, and on a log axis every 1, 2, 5 x 10^k in between."""
        ends = [self.y0, self.y1]
        if not self.log:
            return ends
        inner = [
            math.log10(m * 10.0**k)
            for k in range(math.floor(self.y0), math.ceil(self.y1) + 1)
            for m in (1, 2, 5)
        ]
        span = self.y1 - self.y0
        return ends + [t for t in inner if self.y0 + 0.08 * span < t < self.y1 - 0.08 * span]


def draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, top: int) -> None:
    axes = Axes(panel.train + panel.evals, top, panel.log)
    draw.rectangle([PAD, top + PAD // 2, W - PAD // 2, top + PANEL_H - PAD], outline="black")
    draw.text((PAD, top + 8), panel.title, fill="black")
    for t in axes.ticks():
        value = 10**t if panel.log else t
        _, y = axes.xy((axes.x0, value))
        draw.line([PAD - 4, y, PAD, y], fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
    bottom = top + PANEL_H - PAD + 8
    draw.text((PAD, bottom), f"step {axes.x0:g}", fill="black")
    draw.text((W - PAD - 40, bottom), f"step {axes.x1:g}", fill="black")
    if len(panel.train) > 1:
        draw.line([axes.xy(p) for p in panel.train], fill=TRAIN, width=2)
    for p, color, r in [(p, TRAIN, 3) for p in panel.train if len(panel.train) == 1] + [
        (p, EVAL, 4) for p in panel.evals
    ]:
        cx, cy = axes.xy(p)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
