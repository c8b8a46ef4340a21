"""Synthetic block-pyramid scenes, after the Qwen2-VL launch example
"Output the color and number of each box."

A scene is a small pyramid of coloured blocks (1 to 10, rows of strictly increasing size from the
top, at most 4 per row), each with a distinct white digit, on a plain or lightly textured
background. Everything is a pure function of the ``random.Random`` passed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "orange": (240, 128, 0),
    "yellow": (214, 180, 0),
    "green": (34, 150, 56),
    "blue": (30, 86, 214),
    "purple": (128, 52, 170),
    "pink": (232, 92, 170),
    "brown": (122, 72, 30),
}
COLOUR_NAMES = tuple(COLOURS)


def row_layouts(n: int) -> list[tuple[int, ...]]:
    """Every pyramid of ``n`` blocks: row sizes strictly increasing from the top, each 1..4."""
    out: list[tuple[int, ...]] = []

    def extend(prefix: tuple[int, ...], left: int) -> None:
        if left == 0:
            out.append(prefix)
            return
        for size in range((prefix[-1] + 1) if prefix else 1, min(4, left) + 1):
            extend(prefix + (size,), left - size)

    extend((), n)
    return out


@dataclass(frozen=True)
class Block:
    colour: str
    number: int
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in image pixels (x2, y2 exclusive)
    row: int  # 0 = top
    col: int  # 0 = left


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    blocks: tuple[Block, ...]  # reading order: rows from the top, left to right
    background: tuple[int, int, int]
    texture: int  # seed of the background texture, 0 = plain

    @property
    def rows(self) -> list[list[Block]]:
        rows: list[list[Block]] = []
        for b in self.blocks:
            if b.row == len(rows):
                rows.append([])
            rows[-1].append(b)
        return rows

    def by_number(self, number: int) -> Block:
        return next(b for b in self.blocks if b.number == number)


GAP = 4  # pixels between neighbouring blocks, at least
CELL = 56  # scene pixels per vision token: the demo checkpoint sees scenes at half size (28 px)
SIDE = 280  # a scene is 5 x 5 cells: 25 vision tokens
SCALE = 2  # scene pixels per pixel the model sees (``tasks.MAX_PIXELS`` halves a scene)


def random_scene(
    rng: random.Random,
    n_blocks: int | None = None,
    size: tuple[int, int] | None = None,
    colours: tuple[str, ...] = COLOUR_NAMES,
) -> Scene:
    """A random pyramid scene; ``n_blocks`` 1..10 (None: uniform), ``size`` (default 280 x 280).

    Every block fills one 56-px cell of a lattice that, at the half size the demo model sees,
    is exactly its grid of merged vision tokens: one token per block, the digit always at the
    same offset to the ViT's patches. Learning from scratch on a CPU hinges on that: a ViT has
    no translation equivariance inside a patch, and a decoder that must pool a digit from
    fragments spread over several tokens stayed at chance on full scenes. Rows are centred
    to the nearest cell (a row of 2 under a row of 1 leans left or right at random); the
    pyramid's place and the blocks' size (42-48 px) vary, and each block jitters by 2 px.
    """
    n = rng.randint(1, 10) if n_blocks is None else n_blocks
    if not 1 <= n <= 10:
        raise ValueError(f"a scene has 1 to 10 blocks, got {n}")
    width, height = size or (SIDE, SIDE)
    cols, nrows_max = width // CELL, height // CELL
    layouts = [r for r in row_layouts(n) if max(r) <= cols and len(r) <= nrows_max]
    if not layouts:
        raise ValueError(f"{n} blocks do not fit a {width}x{height} scene of {CELL}-px cells")
    rows = rng.choice(layouts)
    widest = max(rows)
    cx0 = rng.randint(0, cols - widest)
    cy0 = rng.randint(0, nrows_max - len(rows))
    side = rng.randint(42, CELL - 2 * GAP)  # with the jitter, gaps stay >= GAP
    numbers = rng.sample(range(10), n)
    blocks = []
    for r, count in enumerate(rows):
        shift = (widest - count) // 2 + ((widest - count) % 2) * rng.randint(0, 1)
        for c in range(count):
            centred = (CELL - side) // 2  # + up to 2 px each way: a pixel where the model looks
            x1 = (cx0 + shift + c) * CELL + centred + rng.randint(-2, 2)
            y1 = (cy0 + r) * CELL + centred + rng.randint(-2, 2)
            blocks.append(
                Block(
                    rng.choice(colours), numbers[len(blocks)], (x1, y1, x1 + side, y1 + side), r, c
                )
            )
    shade = rng.randint(215, 250)
    tint = tuple(min(255, shade + rng.randint(-10, 5)) for _ in range(3))
    texture = rng.randint(1, 2**31) if rng.random() < 0.5 else 0
    return Scene(width, height, tuple(blocks), tint, texture)


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render(scene: Scene, visible: int | None = None) -> Image.Image:
    """The scene as an RGB image; ``visible`` draws only the first blocks (video frames)."""
    img = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(img)
    if scene.texture:
        trng = random.Random(scene.texture)
        step = trng.randint(6, 14)
        base = scene.background
        for i in range(-scene.height, scene.width, step):  # faint diagonal stripes
            c = tuple(max(0, v - trng.randint(6, 14)) for v in base)
            draw.line([(i, 0), (i + scene.height, scene.height)], fill=c, width=1)
    for b in scene.blocks[:visible]:
        x1, y1, x2, y2 = b.box
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=COLOURS[b.colour])
        side = x2 - x1
        font = _font(max(8, int(side * 0.7)))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        white = (255, 255, 255)  # bold strokes: still legible at the model's 14 px patches
        draw.text(
            (cx, cy),
            str(b.number),
            fill=white,
            font=font,
            anchor="mm",
            stroke_width=max(1, side // 22),
            stroke_fill=white,
        )
    return img
