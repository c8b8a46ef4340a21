"""loss.png read back pixel by pixel: where the blue (train) and orange (eval) marks are."""

from __future__ import annotations

import numpy as np
from PIL import Image

from qwenvl.train.plot import EVAL, PANEL_H, TRAIN, plot_losses


def _column_y(img: np.ndarray, color, x: int, top: int) -> float | None:
    """Mean row of ``color`` in column ``x`` of the panel starting at row ``top``."""
    rows = np.nonzero((img[top : top + PANEL_H, x] == color).all(-1))[0]
    return float(rows.mean()) if len(rows) else None


def _trace(img, color, top):
    cols = [(x, _column_y(img, color, x, top)) for x in range(img.shape[1])]
    return np.array([(x, y) for x, y in cols if y is not None])


def test_exponential_decay_is_a_straight_line_and_the_tail_fills_the_zoom(tmp_path):
    # loss 8 -> 8 / 2^10: on a linear axis everything after step 60 would sit in the bottom 2 %
    metrics = [{"step": s, "loss": 8 * 0.5 ** (s / 20)} for s in range(1, 201)]
    metrics.append({"step": 100, "eval_loss": 8 * 0.5 ** (100 / 20)})
    img = np.asarray(Image.open(plot_losses(metrics, tmp_path / "loss.png")).convert("RGB"))
    assert img.shape[0] == 2 * PANEL_H
    top = _trace(img, TRAIN, 0)
    fit = np.polyfit(top[:, 0], top[:, 1], 1)
    residual = np.abs(np.polyval(fit, top[:, 0]) - top[:, 1]).max()
    height = top[:, 1].max() - top[:, 1].min()
    print(f"log panel: straight within {residual:.2f} px over {height:.0f} px")
    assert residual < 2.5 and height > 150
    # the eval dot, equal to the train loss at step 100, sits on the train line
    dot = _trace(img, EVAL, 0)
    x = int(round(dot[:, 0].mean()))
    assert abs(dot[:, 1].mean() - np.polyval(fit, x)) < 3
    # the zoom (steps 101..200, linear) spans the panel's height, top to bottom
    zoom = _trace(img, TRAIN, PANEL_H)
    print(f"zoom panel: the tail spans {np.ptp(zoom[:, 1]):.0f} px")
    assert np.ptp(zoom[:, 1]) > 0.75 * (PANEL_H - 90)


def test_dpo_gets_the_reward_margin_panel(tmp_path):
    metrics = [
        {"step": s, "loss": 0.69 / s, "margin": -1 + 4 * s / 30, "lr": 1e-5} for s in range(1, 31)
    ]
    metrics.append({"step": 30, "eval_loss": 0.02, "eval_margin": 3.0})
    img = np.asarray(Image.open(plot_losses(metrics, tmp_path / "loss.png")).convert("RGB"))
    assert img.shape[0] == 2 * PANEL_H
    margin = _trace(img, TRAIN, PANEL_H)
    fit = np.polyfit(margin[:, 0], margin[:, 1], 1)
    assert fit[0] < 0  # rising margin: rows go up the image
    assert np.abs(np.polyval(fit, margin[:, 0]) - margin[:, 1]).max() < 2.5  # linear in steps
    assert len(_trace(img, EVAL, PANEL_H))  # the eval margin's dot
