"""M-RoPE positions against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from qwenvl.errors import PromptError
from qwenvl.models.qwen2_vl.positions import get_mrope_positions
from qwenvl.processing.prompt import PromptInputs
from scoring import pad_batch

IMG, VID, TXT = 900, 901, 5


def positions(ids, **kw):
    kw.setdefault("image_token_id", IMG)
    kw.setdefault("video_token_id", VID)
    return get_mrope_positions(ids, **kw)


def test_text_only_is_plain_rope():
    pos, delta = positions([TXT] * 7)
    assert pos.tolist() == [list(range(7))] * 3
    assert delta == 0


def test_one_image():
    # 5 text tokens, an image of grid (1, 4, 6) -> 2x3 merged tokens, 2 text tokens
    ids = [TXT] * 5 + [IMG] * 6 + [TXT] * 2
    pos, delta = positions(ids, image_grids=[(1, 4, 6)])
    assert pos[0].tolist() == [0, 1, 2, 3, 4] + [5] * 6 + [8, 9]
    assert pos[1].tolist() == [0, 1, 2, 3, 4] + [5, 5, 5, 6, 6, 6] + [8, 9]
    assert pos[2].tolist() == [0, 1, 2, 3, 4] + [5, 6, 7, 5, 6, 7] + [8, 9]
    assert delta == 10 - len(ids)


def test_two_images():
    ids = [TXT] * 2 + [IMG] * 4 + [TXT] + [IMG] * 2 + [TXT]
    pos, delta = positions(ids, image_grids=[(1, 4, 4), (1, 2, 4)])
    # image 1 at 2: H/W 2..3 -> next 4; text 4; image 2 at 5: 1x2 -> W 5..6, next 7
    assert pos[0].tolist() == [0, 1, 2, 2, 2, 2, 4, 5, 5, 7]
    assert pos[1].tolist() == [0, 1, 2, 2, 3, 3, 4, 5, 5, 7]
    assert pos[2].tolist() == [0, 1, 2, 3, 2, 3, 4, 5, 6, 7]
    assert delta == 8 - len(ids)


@pytest.mark.parametrize(
    ("second", "expected_t"),
    [
        (0.5, [0, 1, 2, 3]),  # interval 1.0
        (1.0, [0, 2, 4, 6]),  # interval 2.0 (2 fps, tokens_per_second 2)
        (1.7, [0, 3, 6, 10]),  # interval 3.4: trunc(0, 3.4, 6.8, 10.2)
    ],
)
def test_time_aligned_video(second, expected_t):
    # grid (4, 4, 4): 4 temporal groups of 2x2 merged tokens, starting at cur = 3
    ids = [TXT] * 3 + [VID] * 16 + [TXT]
    pos, _ = positions(
        ids, video_grids=[(4, 4, 4)], second_per_grid_ts=[second], tokens_per_second=2
    )
    t = pos[0, 3:19].view(4, 4)
    assert t[:, 0].tolist() == [3 + x for x in expected_t]
    assert (t == t[:, :1]).all()
    assert pos[1, 3:19].tolist() == [3, 3, 4, 4] * 4
    assert pos[2, 3:19].tolist() == [3, 4, 3, 4] * 4
    # text continues after the largest position of the block (the trained rule)
    assert pos[:, 19].tolist() == [3 + expected_t[-1] + 1] * 3


def test_qwen2_vl_video_has_unit_interval():
    ids = [VID] * 8
    pos, delta = positions(ids, video_grids=[(2, 4, 4)])
    assert pos[0].tolist() == [0] * 4 + [1] * 4
    assert delta == 2 - 8


def test_image_and_video():
    ids = [TXT] + [IMG] * 4 + [VID] * 8 + [TXT]
    pos, _ = positions(
        ids,
        image_grids=[(1, 4, 4)],
        video_grids=[(2, 4, 4)],
        second_per_grid_ts=[0.5],
        tokens_per_second=2,
    )
    assert pos[:, 1:5].tolist() == [[1, 1, 1, 1], [1, 1, 2, 2], [1, 2, 1, 2]]
    # video starts at 3 (image max 2 + 1); interval 1 -> T 3,3,3,3,4,4,4,4
    assert pos[0, 5:13].tolist() == [3] * 4 + [4] * 4
    assert pos[:, 13].tolist() == [5, 5, 5]


def test_left_padded_batch():
    a = PromptInputs([TXT] * 3, positions=positions([TXT] * 3)[0])
    ids_b = [TXT] + [IMG] * 4
    b = PromptInputs(ids_b, positions=positions(ids_b, image_grids=[(1, 4, 4)])[0])
    ids, pos, valid = pad_batch([a, b], pad_token_id=0)
    assert valid.tolist() == [[False, False, True, True, True], [True] * 5]
    assert pos[:, 0].tolist() == [[0, 0, 0, 1, 2]] * 3  # pads get 0; each row starts at 0
    assert pos[:, 1].tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 2, 2], [0, 1, 2, 1, 2]]


def test_mismatched_grids_are_errors():
    with pytest.raises(PromptError, match="more image placeholders"):
        positions([IMG] * 4)
    with pytest.raises(PromptError, match="does not match grid"):
        positions([IMG] * 3, image_grids=[(1, 4, 4)])
    with pytest.raises(PromptError, match="more images given"):
        positions([TXT], image_grids=[(1, 4, 4)])


def test_decode_position_is_global_max_plus_one():
    ids = [TXT] * 2 + [IMG] * 16 + [TXT]
    pos, delta = positions(ids, image_grids=[(1, 8, 8)])
    first_decode = len(ids) + delta
    assert first_decode == int(pos.max()) + 1
    assert isinstance(delta, int) and torch.is_tensor(pos)
