"""The loss curve as a PNG, drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

W, H, PAD = 800, 480, 60


def plot_losses(metrics: list[dict[str, Any]], path: str | Path) -> Path:
    """Training loss per step (blue line) and evaluation loss (orange dots)."""
    train = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if m.get("eval_loss") is not None]
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    points = train + evals
    draw.rectangle([PAD, PAD // 2, W - PAD // 2, H - PAD], outline="black")
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)

        def xy(p: tuple[float, float]) -> tuple[float, float]:
            fx = (p[0] - x0) / (x1 - x0)
            fy = (p[1] - y0) / (y1 - y0)
            return PAD + fx * (W - 1.5 * PAD), H - PAD - fy * (H - 1.5 * PAD)

        if len(train) > 1:
            draw.line([xy(p) for p in train], fill=(31, 119, 180), width=2)
        for p in train if len(train) == 1 else []:
            cx, cy = xy(p)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(31, 119, 180))
        for p in evals:
            cx, cy = xy(p)
            draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=(255, 127, 14))
        draw.text((5, PAD // 2), f"{y1:.4g}", fill="black")
        draw.text((5, H - PAD - 10), f"{y0:.4g}", fill="black")
        draw.text((PAD, H - PAD + 8), f"step {x0}", fill="black")
        draw.text((W - PAD - 40, H - PAD + 8), f"step {x1}", fill="black")
    draw.text((PAD, 8), "loss (blue: train, orange: eval)", fill="black")
    image.save(path)
    return Path(path)
