from __future__ import annotations

import pytest
import torch

from qwenvl.checkpoint import load_model
from qwenvl.processing.prompt import Processor
from qwenvl.train.data import Sample
from qwenvl.train.dataset import load_sft
from qwenvl.train.packing import IGNORE, collate, pack, sample_losses


def hf_summed_loss(hf: torch.nn.Module, sample: Sample) -> float:
    """transformers' causal-LM loss of one sample with ``labels=`` (its target tokens, -100
    elsewhere), times the number of targets: the summed cross-entropy, computed by the reference
    implementation (its own label shift, M-RoPE positions and vision tower)."""
    ids = torch.tensor([sample.token_ids])
    labels = torch.where(sample.targets, ids[0], IGNORE)[None]
    image, video = hf.config.image_token_id, hf.config.video_token_id
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == image).long() + 2 * (ids == video).long(),
        "labels": labels,
    }
    if sample.images:
        inputs["pixel_values"] = torch.cat([im.pixel_values for im in sample.images])
        inputs["image_grid_thw"] = torch.tensor([im.grid_thw for im in sample.images])
    with torch.no_grad():
        loss = hf(**inputs).loss
    return float(loss) * int((labels[0, 1:] != IGNORE).sum())


def test_first_fit_pack():
    assert pack([5, 4, 3, 2], 7) == [[0, 3], [1, 2]]
    assert pack([5, 4, 3, 2], 7, order=[3, 2, 1, 0]) == [[3, 2], [1], [0]]
    with pytest.raises(ValueError):
        pack([8], 7)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_packed_row_equals_samples_one_by_one(checkpoints, hf_models, sft_file, family):
    path = checkpoints(family)
    model, config = load_model(path, dtype="float32")
    samples = load_sft(sft_file, Processor.from_pretrained(path, config))
    assert sum(bool(s.images) for s in samples) == 3
    assert all(not s.targets[0] and s.num_targets > 0 for s in samples)
    packed = collate([samples], pad_token_id=0)
    # never attends across samples
    seg = packed.segments[0]
    assert not (packed.mask[0, 0] & (seg[:, None] != seg[None, :])).any()
    with torch.no_grad():
        together = sample_losses(model, packed)
        alone = torch.cat([sample_losses(model, collate([[s]], 0)) for s in samples])
        padded = sample_losses(model, collate([[s] for s in samples], 0))  # right-padded batch
    # the truth: transformers' loss of each sample on its own (same checkpoint, labels=)
    reference = torch.tensor([hf_summed_loss(hf_models(family), s) for s in samples])
    torch.testing.assert_close(alone, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(together, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(padded, reference, atol=1e-4, rtol=0)
    n = sum(s.num_targets for s in samples)
    assert (packed.labels != IGNORE).sum() == n
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert abs(float(together.sum() / n - reference.sum() / n)) <= 1e-5
    diff = float((together - reference).abs().max())
    print(f"packing: losses {reference.tolist()}, max per-sample diff to transformers {diff:.2e}")
