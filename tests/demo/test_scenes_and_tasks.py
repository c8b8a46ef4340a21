"""The demo data: pyramids as specified, answers that agree with the rendered pixels."""

from __future__ import annotations

import json
import random

import pytest
import torch

from qwenvl.demo.scenes import (
    CELL,
    COLOURS,
    GAP,
    SCALE,
    SIDE,
    Block,
    Scene,
    random_scene,
    render,
    row_layouts,
)
from qwenvl.demo.supervision import AuxHeads, batch_labels, block_crop, cell_labels
from qwenvl.demo.tasks import (
    MAX_PIXELS,
    MIN_PIXELS,
    TASKS,
    list_answer,
    parse_int,
    parse_list,
    resized_box,
    sample_at,
    write_jsonl,
)
from qwenvl.processing.image import smart_resize


def test_row_layouts_are_pyramids() -> None:
    for n in range(1, 11):
        layouts = row_layouts(n)
        assert layouts, n
        for rows in layouts:
            assert sum(rows) == n and all(1 <= r <= 4 for r in rows)
            assert all(a < b for a, b in zip(rows, rows[1:]))  # top row smallest
    assert row_layouts(10) == [(1, 2, 3, 4)]


@pytest.mark.parametrize("seed", range(20))
def test_scene_geometry(seed: int) -> None:
    s = random_scene(random.Random(seed))
    assert (s.width, s.height) == (SIDE, SIDE)
    # the processor halves the picture: a 56-px cell becomes one 28-px merged vision token
    assert smart_resize(s.height, s.width, 28, MIN_PIXELS, MAX_PIXELS) == (SIDE // 2, SIDE // 2)
    assert SCALE * 28 == CELL
    sides = {b.box[2] - b.box[0] for b in s.blocks} | {b.box[3] - b.box[1] for b in s.blocks}
    assert len(sides) == 1 and 42 <= sides.pop() <= CELL - 2 * GAP  # one size per scene
    cells = set()
    for b in s.blocks:
        # each block lies inside one cell, centred up to 2 px
        cx, cy = b.box[0] // CELL, b.box[1] // CELL
        assert (b.box[2] - 1) // CELL == cx and (b.box[3] - 1) // CELL == cy
        assert abs((b.box[0] + b.box[2]) / 2 - (cx + 0.5) * CELL) <= 2.5
        assert abs((b.box[1] + b.box[3]) / 2 - (cy + 0.5) * CELL) <= 2.5
        cells.add((cx, cy))
    assert len(cells) == len(s.blocks)
    for row in s.rows:  # a row is one line of adjacent cells
        xs = [b.box[0] // CELL for b in row]
        assert xs == list(range(xs[0], xs[0] + len(row)))
        assert len({b.box[1] // CELL for b in row}) == 1
    for a_row, b_row in zip(s.rows, s.rows[1:]):  # rows stack, each under the one above
        assert b_row[0].box[1] // CELL == a_row[0].box[1] // CELL + 1
        assert b_row[0].box[0] // CELL <= a_row[0].box[0] // CELL
        assert b_row[-1].box[0] // CELL >= a_row[-1].box[0] // CELL
    assert len({b.number for b in s.blocks}) == len(s.blocks)  # distinct digits
    for a in s.blocks:
        assert 0 <= a.box[0] < a.box[2] <= s.width and 0 <= a.box[1] < a.box[3] <= s.height
    # reading order: rows from the top, left to right within a row
    for row in s.rows:
        assert [b.col for b in row] == list(range(len(row)))
        assert all(a.box[0] < b.box[0] for a, b in zip(row, row[1:]))
    tops = [row[0].box[1] for row in s.rows]
    assert tops == sorted(tops)
    # the pixel at each block's corner has the block's colour
    img = render(s)
    for b in s.blocks:
        assert img.getpixel((b.box[0] + 1, b.box[1] + 1)) == COLOURS[b.colour]


def test_same_seed_same_sample() -> None:
    a, b = sample_at(3, 7), sample_at(3, 7)
    assert a.answer == b.answer and a.question == b.question
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert sample_at(3, 8).answer != a.answer or sample_at(3, 8).task != a.task


def test_list_answer_round_trips() -> None:
    s = random_scene(random.Random(1), 6)
    assert parse_list(list_answer(s)) == [(b.colour, b.number) for b in s.blocks]
    assert list_answer(s).count("\n") == len(s.rows) - 1
    assert parse_int("There are 7 boxes") == 7 and parse_int("none") is None


def test_when_answer_matches_the_frames() -> None:
    for i in range(6):
        s = sample_at(11, i, ["when"])
        block = s.info["scene"].by_number(int(s.question.split("number ")[1].split()[0]))
        x, y = block.box[0] + 1, block.box[1] + 1
        shown = [f.getpixel((x, y)) == COLOURS[block.colour] for f in s.video]
        first = shown.index(True)
        assert first == 2 * int(s.answer)  # 2 frames a second
        assert all(shown[first:])


def test_ground_answer_is_in_resized_pixels() -> None:
    s = sample_at(5, 3, ["ground"])
    obj = json.loads(s.answer.split("\n", 2)[2].rsplit("\n", 2)[0])
    box = obj["bbox_2d"]
    assert box == resized_box(s.info["scene"], s.info["number"])
    assert obj["label"] == f"the box with the number {s.info['number']}"


def test_cell_labels_by_hand() -> None:
    # one 56x56 block at the top-left of a 112x112 image: exactly the 2x2 top-left merged cells
    blk = Block("blue", 7, (0, 0, 56, 56), 0, 0)
    scene = Scene(112, 112, (blk,), (240, 240, 240), 0)
    labels = cell_labels(scene, 4, 4)
    on = [0, 1, 4, 5]
    for i in range(16):
        if i in on:
            assert labels[i].tolist() == [list(COLOURS).index("blue") + 1, 8, 1, 1, 7]
        else:
            assert labels[i].tolist() == [0, 0, 0, 0, -1]


def test_digit_logits_pool_each_block() -> None:
    """The digit head sees the mean of a block's tokens: one logit row per block, by hand."""
    torch.manual_seed(0)
    heads = AuxHeads(6)
    # two pictures; picture 0: block 3 on tokens 0, 1; picture 1: block 3 on token 1, block 5 on 2
    a = torch.tensor([[1, 4, 1, 1, 3], [1, 4, 1, 1, 3], [0, 0, 0, 0, -1]])
    b = torch.tensor([[0, 0, 0, 0, -1], [2, 4, 1, 1, 3], [3, 6, 2, 1, 5]])
    labels = batch_labels([a, b])
    feats = torch.randn(6, 6)
    logits, truth = heads.logits(feats, labels)[1]
    w, bias = heads.proj.weight[1 + 8 : 1 + 8 + 11], heads.proj.bias[1 + 8 : 1 + 8 + 11]
    means = torch.stack([feats[0:2].mean(0), feats[4], feats[5]])
    torch.testing.assert_close(logits, means @ w.T + bias)
    assert truth.tolist() == [4, 4, 6]


def test_block_crop_is_on_the_lattice_and_labelled() -> None:
    rng = random.Random(4)
    s = random_scene(rng, 6)
    image = render(s)
    for _ in range(10):
        crop = block_crop(s, image, rng)
        cs = crop.info["scene"]
        assert crop.images[0].size == (3 * CELL, 3 * CELL) == (cs.width, cs.height)
        labels = cell_labels(cs, 3, 3)
        assert (labels[:, 4] >= 0).any()  # the chosen block covers a cell
        assert int((labels[:, 4] >= 0).sum()) == len(cs.blocks)  # one token per block
        for b in cs.blocks:  # the crop's pixels show each block where its box says
            assert 0 <= b.box[0] and b.box[2] <= 3 * CELL
            assert crop.images[0].getpixel((b.box[0] + 1, b.box[1] + 1)) == COLOURS[b.colour]


def test_write_jsonl_is_readable_by_the_trainer(tmp_path) -> None:
    from qwenvl.train.data import read_jsonl

    path = write_jsonl(tmp_path, len(TASKS), seed=2)
    rows = read_jsonl(path)
    assert len(rows) == len(TASKS)
    kinds = [c["type"] for _, r in rows for c in r["messages"][0]["content"]]
    assert "video" in kinds and kinds.count("image") >= len(TASKS) - 1


def test_bridged_logits_are_dot_products_with_the_token_embeddings() -> None:
    torch.manual_seed(1)
    embed = torch.nn.Embedding(30, 6)
    colour_ids = [[3], [4, 5], [6], [7], [8], [9], [10], [11]]
    heads = AuxHeads(6, embed, colour_ids, list(range(12, 22)))
    labels = torch.tensor([[2, 8, 1, 1, 7], [0, 0, 0, 0, -1]])
    feats = torch.randn(2, 6)
    colour = heads.logits(feats, labels)[0]
    w = embed.weight
    want = torch.stack([heads.background, w[3], (w[4] + w[5]) / 2, *w[6:12]])
    torch.testing.assert_close(colour, feats @ want.T)
    digit, truth = heads.logits(feats, labels)[1]
    torch.testing.assert_close(digit, feats[:1] @ torch.stack([heads.background, *w[12:22]]).T)
    assert truth.tolist() == [8]
