"""What every token of a training sample should be: the demo recipe's dense targets.

The probes on vision tokens (``AuxHeads``) and their per-cell labels (``cell_labels``), the
answer's spans that read one block (``answer_targets``) and the question's words that name it
(``question_cue``), the scene behind every vision item (``sample_scenes``), and the 3x3-cell
crops of the vision stage (``block_crop``). ``qwenvl.demo.train`` turns them into losses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from qwenvl.demo.scenes import CELL, COLOUR_NAMES, Scene
from qwenvl.demo.tasks import DemoSample, ground_phrase

HEADS = {"colour": len(COLOUR_NAMES) + 1, "digit": 11, "row": 5, "col": 5}
MERGED_PX = 28
PLACES = 8  # classes of the decoder's place probe per axis: frame (second), row, column


class AuxHeads(nn.Module):
    """Probes on merged vision tokens: what lies under each one.

    With ``embed`` (the decoder's token embeddings) and the token ids of the colour names and
    digits, the colour and digit logits are dot products with those embeddings: the vision
    tokens are pulled towards the very vectors the decoder reads and (tied) writes for "red" or
    "7", so answering becomes copying, which a decoder learns far sooner than a new mapping.
    """

    def __init__(
        self,
        dim: int,
        embed: nn.Embedding | None = None,
        colour_ids: Sequence[Sequence[int]] = (),
        digit_ids: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, sum(HEADS.values()))
        self.embed = [embed]  # a list: not a submodule (the model owns and saves it)
        self.colour_ids = [list(ids) for ids in colour_ids]
        self.digit_ids = list(digit_ids)
        # the one token the decoder names a colour (its first) or a digit with, by class - 1
        self.colour_tokens = torch.tensor([ids[0] for ids in self.colour_ids], dtype=torch.long)
        self.digit_tokens = torch.tensor(self.digit_ids, dtype=torch.long)
        self.background = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(()))
        # on the decoder's vision tokens: their frame, row and column (see Recipe.place_loss)
        self.where = nn.Linear(dim, 3 * PLACES)
        # on the last guided layer's attention output at answer tokens: the place of the block
        # they read (see Recipe.readout_loss)
        self.find = nn.Linear(dim, 3 * PLACES)

    def _bridged(self, x: torch.Tensor, head: int) -> torch.Tensor | None:
        table = self.embed[0]
        if table is None:
            return None
        w = table.weight.float()
        if head == 0:
            rows = [self.background] + [w[ids].mean(0) for ids in self.colour_ids]
        else:
            rows = [self.background] + [w[i] for i in self.digit_ids]  # 0 = background
        return self.scale * (x @ torch.stack(rows).T)

    def logits(self, feats: torch.Tensor, labels: torch.Tensor) -> list:
        """Per-token logits, except the digit's: one per block, from the mean of its tokens.

        A digit covers only some of its block's tokens; asking every token for it is asking
        for a label it cannot see. Pooled, the model may keep the digit where it sees it, and
        the decoder's attention over a block's tokens does the same pooling.
        """
        feats, labels = feats.float(), labels.to(feats.device)
        out = list(self.proj(feats).split(list(HEADS.values()), dim=-1))
        bridged = self._bridged(feats, 0)
        if bridged is not None:
            out[0] = bridged
        block = labels[:, 4]
        on_block = block >= 0
        ids, inverse = torch.unique(block[on_block], return_inverse=True)
        feats = feats[on_block]
        pooled = feats.new_zeros(len(ids), feats.shape[1]).index_add_(0, inverse, feats)
        pooled = pooled / torch.bincount(inverse, minlength=len(ids)).unsqueeze(1)
        digit = labels[on_block, 1].new_zeros(len(ids)).scatter_(0, inverse, labels[on_block, 1])
        digit_logits = self._bridged(pooled, 1)
        if digit_logits is None:
            digit_logits = self.proj(pooled).split(list(HEADS.values()), dim=-1)[1]
        out[1] = (digit_logits, digit)
        return out

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Colour (or background) on every token; row and column on block tokens only, so the
        few block tokens are not drowned by the background ones; the digit per block."""
        labels = labels.to(feats.device)
        logits = self.logits(feats, labels)
        on_block = labels[:, 0] > 0
        total = F.cross_entropy(logits[0], labels[:, 0])
        if bool(on_block.any()):
            total = total + F.cross_entropy(*logits[1])
            for i in range(2, len(HEADS)):
                total = total + F.cross_entropy(logits[i][on_block], labels[on_block, i])
        return total / len(HEADS)

    @torch.no_grad()
    def accuracy(self, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        labels = labels.to(feats.device)
        logits = self.logits(feats, labels)
        on_block = labels[:, 0] > 0
        out = {}
        for i, (name, lg) in enumerate(zip(HEADS, logits)):
            if i == 1:
                pred, truth = lg[0].argmax(-1), lg[1]
            else:
                pred, truth = lg[on_block].argmax(-1), labels[on_block, i]
            out[name] = float((pred == truth).float().mean()) if len(truth) else 0.0
        return out


def cell_labels(scene: Scene, grid_h: int, grid_w: int) -> torch.Tensor:
    """``[grid_h * grid_w, 5]`` labels of the merged tokens of ``scene`` resized to the grid:
    colour, digit, row, column (each 0 for the background) and the block's id (-1).

    A cell belongs to the block covering most of it (at least 30 %), else to the background.
    """
    sx = grid_w * MERGED_PX / scene.width
    sy = grid_h * MERGED_PX / scene.height
    out = torch.zeros(grid_h * grid_w, len(HEADS) + 1, dtype=torch.long)
    out[:, 4] = -1
    area = MERGED_PX * MERGED_PX
    for i in range(grid_h):
        for j in range(grid_w):
            cx1, cy1 = j * MERGED_PX, i * MERGED_PX
            best, best_cover = None, 0.3 * area
            for b in scene.blocks:
                x1, y1, x2, y2 = b.box[0] * sx, b.box[1] * sy, b.box[2] * sx, b.box[3] * sy
                w = min(x2, cx1 + MERGED_PX) - max(x1, cx1)
                h = min(y2, cy1 + MERGED_PX) - max(y1, cy1)
                if w > 0 and h > 0 and w * h > best_cover:
                    best, best_cover = b, w * h
            if best is not None:
                out[i * grid_w + j] = torch.tensor(
                    [
                        COLOUR_NAMES.index(best.colour) + 1,
                        best.number + 1,
                        best.row + 1,
                        best.col + 1,
                        best.number,  # distinct within a scene: the block's id
                    ]
                )
    return out


PLACE_KEY = {"ground": "bbox_2d", "click": "coordinate"}  # the JSON key before a place


def answer_targets(sample: DemoSample) -> list[tuple[int, int, int, int]]:
    """The answer's character spans that read one block: ``(start, end, block number, group)``,
    ``group`` being the video's temporal group (its second) where the block appears, or -1."""
    if sample.task == "list":
        out, at = [], 0
        for row in sample.info["scene"].rows:
            for c, b in enumerate(row):
                text = f"{b.colour} {b.number}"
                out.append((at, at + len(text), b.number, -1))
                at += len(text) + (2 if c < len(row) - 1 else 1)  # ", " or a newline
        return out
    if sample.task == "number":
        return [(0, len(sample.answer), int(sample.answer), -1)]
    if sample.task in ("ground", "click"):
        start = sample.answer.index("[", sample.answer.index(PLACE_KEY[sample.task]))
        return [(start, sample.answer.index("]", start) + 1, sample.info["number"], -1)]
    if sample.task == "when":
        return [(0, len(sample.answer), sample.info["number"], sample.info["second"])]
    return []


def question_cue(sample: DemoSample) -> tuple[int, int] | None:
    """The question's characters that say which block to read: the colour asked for, or the
    number N of grounding and ``when``; None when the question names no block."""
    q = sample.question
    if sample.task == "number":
        colour = sample.info["scene"].by_number(int(sample.answer)).colour
        start = q.rindex(colour)
        return start, start + len(colour)
    if sample.task in ("ground", "when"):
        phrase = ground_phrase(sample.info["number"])
        end = q.index(phrase) + len(phrase)
        return end - len(str(sample.info["number"])), end
    if sample.task == "click":  # "Click the box with the number 7."
        start = q.rindex(str(sample.info["number"]))
        return start, start + len(str(sample.info["number"]))
    return None


def sample_scenes(sample: DemoSample) -> list[list[Scene]]:
    """Per vision item of the sample, the scene of each temporal group (images: one)."""
    info = sample.info
    if sample.task == "compare":
        return [[info["scenes"][0]], [info["scenes"][1]]]
    if sample.video is not None:
        s: Scene = info["scene"]
        shown = info["shown"]  # per frame, the visible block indices
        groups = [shown[g] for g in range(0, len(shown), 2)]
        return [[replace(s, blocks=tuple(s.blocks[i] for i in g)) for g in groups]]
    return [[info["scene"]]]


def block_crop(scene: Scene, image: Image.Image, rng: random.Random) -> DemoSample:
    """The 3 x 3 cells around one block of ``scene``, on the cell lattice: 9 vision tokens that
    teach the block's digit and colour for the price of a third of a scene."""
    b = rng.choice(scene.blocks)
    cx, cy = b.box[0] // CELL, b.box[1] // CELL
    x0 = CELL * min(max(0, cx - 1), scene.width // CELL - 3)
    y0 = CELL * min(max(0, cy - 1), scene.height // CELL - 3)
    size = 3 * CELL
    blocks = tuple(
        replace(o, box=(o.box[0] - x0, o.box[1] - y0, o.box[2] - x0, o.box[3] - y0))
        for o in scene.blocks
        if o.box[2] > x0 and o.box[0] < x0 + size and o.box[3] > y0 and o.box[1] < y0 + size
    )
    crop = replace(scene, width=size, height=size, blocks=blocks)
    cut = image.crop((x0, y0, x0 + size, y0 + size))
    return DemoSample("scene", [cut], None, "", "", {"scene": crop})


def item_labels(scenes: list[Scene], grid: tuple[int, int, int], merge: int = 2) -> torch.Tensor:
    _, h, w = grid
    return torch.cat([cell_labels(s, h // merge, w // merge) for s in scenes])


def batch_labels(per_item: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenated item labels with block ids made unique across the batch (a video's
    frames pool each block over all the frames it is in)."""
    out, offset = [], 0
    for lab in per_item:
        lab = lab.clone()
        on = lab[:, 4] >= 0
        lab[on, 4] += offset
        offset += 10
        out.append(lab)
    return torch.cat(out)
