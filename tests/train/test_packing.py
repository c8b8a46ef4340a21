from __future__ import annotations

import pytest
import torch

from qwenvl.checkpoint import load_model
from qwenvl.processing.prompt import Processor
from qwenvl.train.data import load_sft
from qwenvl.train.packing import IGNORE, collate, pack, sample_losses


def test_first_fit_pack():
    assert pack([5, 4, 3, 2], 7) == [[0, 3], [1, 2]]
    assert pack([5, 4, 3, 2], 7, order=[3, 2, 1, 0]) == [[3, 2], [1], [0]]
    with pytest.raises(ValueError):
        pack([8], 7)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_packed_row_equals_samples_one_by_one(checkpoints, sft_file, family):
    path = checkpoints(family)
    model, config = load_model(path, dtype="float32")
    samples = load_sft(sft_file, Processor.from_pretrained(path, config))
    assert sum(bool(s.images) for s in samples) == 3
    packed = collate([samples], pad_token_id=0)
    # never attends across samples
    seg = packed.segments[0]
    assert not (packed.mask[0, 0] & (seg[:, None] != seg[None, :])).any()
    with torch.no_grad():
        together = sample_losses(model, packed)
        alone = torch.cat([sample_losses(model, collate([[s]], 0)) for s in samples])
        padded = sample_losses(model, collate([[s] for s in samples], 0))  # right-padded batch
    n = sum(s.num_targets for s in samples)
    assert (packed.labels != IGNORE).sum() == n
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    assert abs(float(together.sum() / n - alone.sum() / n)) <= 1e-5
    print(f"packing max per-sample diff {float((together - alone).abs().max()):.2e}")
