"""Chunked vision encoding (``encode_vision`` with ``vision_chunk_patches``) equals one-shot."""

from __future__ import annotations

import pytest
import torch

from qwenvl.checkpoint import load_model

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
# An image, a long video, a tiny image, a short video (patch units; h, w even for the 2x2 merge).
# 12x20 patches are 6x10 merge units: Qwen2.5's 4x4-unit windows are partial at the edges.
GRIDS = [(1, 8, 12), (7, 12, 20), (1, 4, 4), (3, 4, 8)]


@pytest.fixture(scope="module")
def models(checkpoints):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_model(checkpoints(family), dtype="float32")[0]
        return cache[family]

    return get


def _calls(model, limit, pixels, grids):
    seen = []
    hook = model.visual.register_forward_pre_hook(
        lambda _, args: seen.append((args[0].shape[0], list(args[1])))
    )
    model.vision_chunk_patches = limit
    try:
        out = model.encode_vision(pixels, grids)
    finally:
        hook.remove()
        model.vision_chunk_patches = type(model).vision_chunk_patches
    return out, seen


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_equals_one_shot(family, models):
    model = models(family)
    dim = model.config.vision.in_channels * 2 * 14 * 14
    rows = sum(t * h * w for t, h, w in GRIDS)
    pixels = torch.randn(rows, dim)
    full, calls = _calls(model, None, pixels, GRIDS)
    assert calls == [(rows, GRIDS)]
    assert full.shape == (rows // 4, model.config.text.hidden_size)

    # 480 patches = 2 groups of 12x20: the long video runs as t = 2, 2, 2, 1; the others
    # (96, 16, 96 patches) stay batched around it.
    chunked, calls = _calls(model, 480, pixels, GRIDS)
    assert calls == [
        (96, [(1, 8, 12)]),
        (480, [(2, 12, 20)]),
        (480, [(2, 12, 20)]),
        (480, [(2, 12, 20)]),
        (240, [(1, 12, 20)]),
        (112, [(1, 4, 4), (3, 4, 8)]),
    ]
    assert (chunked - full).abs().max().item() <= 1e-5

    # A limit below one group: one group per call, and every item over it is split.
    single, calls = _calls(model, 50, pixels, GRIDS)
    assert [g for _, g in calls] == [
        [(1, 8, 12)],
        *[[(1, 12, 20)]] * 7,
        [(1, 4, 4)],
        *[[(1, 4, 8)]] * 3,
    ]
    assert (single - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_default_limit_keeps_small_inputs_in_one_call(family, models):
    model = models(family)
    assert model.vision_chunk_patches == 16384
    pixels = torch.randn(8 * 12 + 2 * 4 * 8, model.config.vision.in_channels * 2 * 14 * 14)
    grids = [(1, 8, 12), (2, 4, 8)]
    out, calls = _calls(model, 16384, pixels, grids)
    assert calls == [(pixels.shape[0], grids)]
    torch.testing.assert_close(out, model.visual(pixels, grids), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_uint8_video_patches_encode_like_float_pixels(family, models):
    """The engine hands videos over as uint8 patches + table; each chunk is normalised on the
    way in, and the features equal those of the float32 ``pixel_values`` exactly."""
    import numpy as np
    from PIL import Image

    from qwenvl.processing.image import VisionPreprocessConfig
    from qwenvl.processing.video_frames import preprocess_video_frames

    model = models(family)
    rng = np.random.default_rng(0)
    frames = [
        Image.fromarray(rng.integers(0, 256, (112, 168, 3), dtype=np.uint8)) for _ in range(6)
    ]
    video = preprocess_video_frames(frames, VisionPreprocessConfig())
    assert video.patches.dtype == torch.uint8
    assert video.pixel_values.dtype == torch.float32
    floats, _ = _calls(model, None, video.pixel_values, [video.grid_thw])
    model.vision_chunk_patches = 8 * 12  # one temporal group per call
    try:
        compact = model.encode_vision(video.patches, [video.grid_thw], lut=video.lut)
    finally:
        model.vision_chunk_patches = type(model).vision_chunk_patches
    assert (compact - floats).abs().max().item() <= 1e-5
