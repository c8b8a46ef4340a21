"""Tests for qwenvl.processing.image: sizes, patch order, bit-parity with transformers' PIL path."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.errors import ConfigError, MediaError
from qwenvl.processing.image import (
    IMAGE_MEAN,
    IMAGE_STD,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VisionPreprocessConfig,
    image_geometry,
    patchify,
    preprocess_image,
    resolve_image_size,
    smart_resize,
    to_rgb,
)
from qwenvl.processing.video_frames import preprocess_video_frames

transformers = pytest.importorskip("transformers")

SMALL_MAX = 256 * 28 * 28  # keeps the reference fast; larger images must be downscaled


@functools.cache
def hf_processor(min_pixels: int, max_pixels: int):
    return transformers.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def reference(image: Image.Image, min_pixels: int, max_pixels: int) -> tuple[torch.Tensor, list]:
    out = hf_processor(min_pixels, max_pixels)(images=image, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"].tolist()


def noise_image(height: int, width: int, seed: int = 0, channels: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def assert_matches_reference(image: Image.Image, cfg: VisionPreprocessConfig, **overrides) -> None:
    lo = overrides.get("min_pixels", cfg.min_pixels)
    hi = overrides.get("max_pixels", cfg.max_pixels)
    ref_values, ref_grid = reference(image, lo, hi)
    ours = preprocess_image(image, cfg, **overrides)
    assert [list(ours.grid_thw)] == ref_grid
    assert ours.pixel_values.dtype == torch.float32
    assert torch.equal(ours.pixel_values, ref_values)


# ---------------------------------------------------------------------------------------------
# smart_resize


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((480, 640), (476, 644)),
        ((1080, 1920), (1092, 1932)),
        ((2400, 1080), (2408, 1092)),
        ((224, 224), (224, 224)),
        ((20, 30), (56, 84)),
        ((5000, 5000), (3556, 3556)),
        ((70, 100), (56, 112)),  # 70/28 = 2.5 rounds half to even -> 2
        ((98, 98), (112, 112)),  # 3.5 -> 4
    ],
)
def test_smart_resize_hand_computed(hw, expected):
    assert smart_resize(*hw, factor=28, min_pixels=3136, max_pixels=12845056) == expected


def test_smart_resize_token_counts_from_notes():
    cfg = VisionPreprocessConfig()
    assert image_geometry(640, 480, cfg).num_tokens == 391
    assert image_geometry(1920, 1080, cfg).num_tokens == 2691
    assert image_geometry(1080, 2400, cfg).num_tokens == 3354
    assert image_geometry(5000, 5000, cfg).num_tokens == 16129
    assert image_geometry(30, 20, cfg).num_tokens == 6


def test_smart_resize_matches_reference_function():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    rng = np.random.default_rng(1)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 6000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.choice([3136, 100352, 50000]))
        hi = int(rng.choice([200704, 602112, 12845056]))
        assert smart_resize(h, w, 28, lo, hi) == ref(h, w, 28, lo, hi), (h, w, lo, hi)


def test_smart_resize_aspect_ratio():
    assert smart_resize(1, 200) == (28, 812)  # exactly 200 is allowed; upscaled to min_pixels
    with pytest.raises(MediaError, match="201"):
        smart_resize(1, 201)
    with pytest.raises(MediaError, match="aspect ratio"):
        smart_resize(201, 1)


def test_smart_resize_rejects_empty_sides():
    with pytest.raises(MediaError, match="positive"):
        smart_resize(0, 10)


# ---------------------------------------------------------------------------------------------
# resolve_image_size / geometry


def test_resolve_image_size_overrides():
    cfg = VisionPreprocessConfig()
    assert resolve_image_size(640, 480, cfg) == (476, 644)
    assert resolve_image_size(640, 480, cfg, max_pixels=64 * 28 * 28) == (168, 252)
    assert resolve_image_size(64, 48, cfg, min_pixels=512 * 28 * 28) == smart_resize(
        48, 64, 28, 512 * 28 * 28, cfg.max_pixels
    )
    # explicit size, snapped to the grid like qwen-vl-utils
    assert resolve_image_size(640, 480, cfg, resized_height=300, resized_width=500) == (308, 504)
    # ...and still bounded by the limits in force (448 = sqrt(SMALL_MAX), but the reference's
    # float arithmetic floors 15.999... to 15)
    assert resolve_image_size(
        640, 480, cfg, resized_height=5000, resized_width=5000, max_pixels=SMALL_MAX
    ) == (420, 420)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resized_height": 100},
        {"resized_width": 100},
        {"min_pixels": 10_000, "max_pixels": 5_000},
        {"max_pixels": 0},
        {"min_pixels": -1},
        {"max_pixels": True},
        {"resized_height": "100", "resized_width": 100},
        {"min_pixels": float("nan")},
    ],
)
def test_resolve_image_size_bad_arguments(kwargs):
    with pytest.raises(MediaError):
        resolve_image_size(640, 480, VisionPreprocessConfig(), **kwargs)


def test_image_geometry():
    geo = image_geometry(100, 70, VisionPreprocessConfig())
    assert (geo.original_width, geo.original_height) == (100, 70)
    assert (geo.resized_width, geo.resized_height) == (112, 56)
    assert geo.grid_thw == (1, 4, 8)
    assert geo.num_tokens == 8


# ---------------------------------------------------------------------------------------------
# parity with transformers.Qwen2VLImageProcessorPil


@pytest.mark.parametrize(
    ("height", "width"),
    [
        (20, 30),
        (70, 100),
        (1001, 333),
        (28, 2800),
        (224, 224),
        (480, 640),
        (1000, 1400),  # above max_pixels: downscaled
        (3, 5),  # upscaled to min_pixels
        (56, 56),  # unchanged size: no resize at all
        (333, 1001),
    ],
)
def test_preprocess_matches_reference(height, width):
    cfg = VisionPreprocessConfig(max_pixels=SMALL_MAX)
    assert_matches_reference(noise_image(height, width, seed=height * 7 + width), cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_pixels": 64 * 28 * 28},
        {"min_pixels": 512 * 28 * 28, "max_pixels": 1024 * 28 * 28},
        {"min_pixels": 16 * 28 * 28},
    ],
)
def test_preprocess_per_item_limits_match_reference(overrides):
    cfg = VisionPreprocessConfig(max_pixels=SMALL_MAX)
    assert_matches_reference(noise_image(120, 90, seed=3), cfg, **overrides)


def test_preprocess_resized_size_matches_reference_of_prior_resize():
    # qwen-vl-utils resizes first; the HF processor then sees an already-valid size.
    cfg = VisionPreprocessConfig()
    image = noise_image(480, 640, seed=4)
    ours = preprocess_image(image, cfg, resized_height=300, resized_width=500)
    assert (ours.geometry.resized_height, ours.geometry.resized_width) == (308, 504)
    assert (ours.geometry.original_height, ours.geometry.original_width) == (480, 640)
    pre = image.resize((504, 308), Image.Resampling.BICUBIC)
    ref_values, ref_grid = reference(pre, cfg.min_pixels, cfg.max_pixels)
    assert [list(ours.grid_thw)] == ref_grid
    assert torch.equal(ours.pixel_values, ref_values)


def _mode_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(5)
    h, w = 50, 70
    images: dict[str, Image.Image] = {
        "RGBA": Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)),
        "LA": Image.fromarray(rng.integers(0, 256, (h, w, 2), dtype=np.uint8)),
        "L": Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)),
        "1": Image.fromarray(rng.integers(0, 2, (h, w), dtype=bool)),
        "CMYK": Image.frombytes(
            "CMYK", (w, h), rng.integers(0, 256, h * w * 4, np.uint8).tobytes()
        ),
        "I;16": Image.fromarray(rng.integers(0, 1000, (h, w), dtype=np.uint16)),
        "I": Image.fromarray(rng.integers(-100, 400, (h, w), dtype=np.int32)),
        "F": Image.fromarray(rng.uniform(-10, 300, (h, w)).astype(np.float32)),
        "YCbCr": noise_image(h, w, seed=6).convert("YCbCr"),
    }
    palette = rng.integers(0, 256, 768, dtype=np.uint8).tobytes()
    p = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).convert("P")
    p.putpalette(palette)
    images["P"] = p
    p_trans = p.copy()
    p_trans.info["transparency"] = 7
    images["P+transparency"] = p_trans
    images["PA"] = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)).convert("PA")
    rgb_trans = noise_image(h, w, seed=8)
    rgb_trans.info["transparency"] = tuple(int(v) for v in np.asarray(rgb_trans)[0, 0])
    images["RGB+transparency"] = rgb_trans
    return images


MODE_IMAGES = _mode_images()


@pytest.mark.parametrize("name", sorted(MODE_IMAGES))
def test_modes_match_reference(name):
    image = MODE_IMAGES[name]
    cfg = VisionPreprocessConfig(max_pixels=SMALL_MAX)
    assert_matches_reference(image, cfg)
    assert to_rgb(image).mode == "RGB"


def test_sixteen_bit_is_clipped_like_reference():
    # The reference does Image.convert("RGB"): 16-bit values are clipped to 255, not scaled.
    image = Image.fromarray(np.array([[0, 100, 255, 256, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 100, 255, 255, 255]


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(image)).min() == 255


def test_to_rgb_returns_rgb_input_unchanged():
    image = noise_image(8, 8)
    assert to_rgb(image) is image


def test_to_rgb_rejects_non_images_and_bad_modes():
    with pytest.raises(MediaError):
        to_rgb(np.zeros((4, 4, 3), np.uint8))  # type: ignore[arg-type]
    with pytest.raises(MediaError, match="La"):
        to_rgb(Image.new("La", (4, 4)))


def test_preprocess_rejects_non_image():
    with pytest.raises(MediaError, match="PIL image"):
        preprocess_image("cat.jpg", VisionPreprocessConfig())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# patchify


def test_patchify_hand_built_order():
    cfg = VisionPreprocessConfig()
    p, m, tp = 14, 2, 2
    rng = np.random.default_rng(9)
    frames = rng.standard_normal((2, 3, 56, 112)).astype(np.float32)
    rows, grid = patchify(frames, cfg)
    assert grid == (1, 4, 8)
    assert rows.shape == (32, 3 * tp * p * p)
    expected = []
    for bh in range(2):
        for bw in range(4):
            for mh in range(m):
                for mw in range(m):
                    y, x = (bh * m + mh) * p, (bw * m + mw) * p
                    block = frames[:, :, y : y + p, x : x + p]  # [TP, C, P, P]
                    expected.append(block.transpose(1, 0, 2, 3).reshape(-1))  # (C, TP, ph, pw)
    assert torch.equal(rows, torch.from_numpy(np.stack(expected)))


def test_patchify_70x100_image_shape():
    out = preprocess_image(noise_image(70, 100), VisionPreprocessConfig())
    assert out.pixel_values.shape == (32, 1176)
    assert out.grid_thw == (1, 4, 8)
    assert out.num_tokens == 8
    # the single frame is duplicated in time: both temporal halves of every row are equal
    v = out.pixel_values.view(32, 3, 2, 14, 14)
    assert torch.equal(v[:, :, 0], v[:, :, 1])


def test_patchify_pads_odd_frames_with_last():
    cfg = VisionPreprocessConfig()
    frames = np.random.default_rng(2).standard_normal((3, 3, 28, 28)).astype(np.float32)
    rows, grid = patchify(frames, cfg)
    assert grid == (2, 2, 2)
    padded, _ = patchify(np.concatenate([frames, frames[-1:]]), cfg)
    assert torch.equal(rows, padded)


def test_patchify_rejects_bad_shapes():
    cfg = VisionPreprocessConfig()
    with pytest.raises(ValueError):
        patchify(np.zeros((1, 3, 30, 28), np.float32), cfg)
    with pytest.raises(ValueError):
        patchify(np.zeros((3, 28, 28), np.float32), cfg)


# ---------------------------------------------------------------------------------------------
# video frames


def test_video_of_identical_frames_equals_image():
    cfg = VisionPreprocessConfig()
    frame = noise_image(240, 320, seed=11)
    video = preprocess_video_frames([frame, frame], cfg)
    image = preprocess_image(frame, cfg, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS)
    assert video.grid_thw == image.grid_thw
    assert torch.equal(video.pixel_values, image.pixel_values)
    assert video.num_tokens == image.num_tokens
    assert video.second_per_grid_t == 1.0


def test_video_mixed_sizes_and_odd_count():
    cfg = VisionPreprocessConfig()
    frames = [noise_image(240, 320, seed=1), noise_image(240, 320, seed=2), noise_image(100, 90)]
    video = preprocess_video_frames(frames, cfg, fps=4.0)
    rh, rw = smart_resize(240, 320, 28, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
    assert (video.resized_height, video.resized_width) == (rh, rw)
    assert (video.original_height, video.original_width) == (240, 320)
    assert video.grid_thw == (2, rh // 14, rw // 14)
    assert video.num_frames == 3
    assert video.second_per_grid_t == 0.5
    assert video.num_tokens == 2 * (rh // 28) * (rw // 28)

    per_group = (rh // 14) * (rw // 14)
    singles = [
        preprocess_image(f, cfg, resized_height=rh, resized_width=rw, max_pixels=VIDEO_MAX_PIXELS)
        for f in frames
    ]
    v = video.pixel_values.view(-1, 3, 2, 14, 14)
    s = [x.pixel_values.view(-1, 3, 2, 14, 14) for x in singles]
    assert torch.equal(v[:per_group, :, 0], s[0][:, :, 0])
    assert torch.equal(v[:per_group, :, 1], s[1][:, :, 0])
    # the odd last frame (resized to the common size) fills both halves of the last group
    assert torch.equal(video.pixel_values[per_group:], singles[2].pixel_values)


def test_video_errors():
    cfg = VisionPreprocessConfig()
    with pytest.raises(MediaError):
        preprocess_video_frames([], cfg)
    with pytest.raises(MediaError, match="fps"):
        preprocess_video_frames([noise_image(56, 56)], cfg, fps=0)
    with pytest.raises(MediaError, match="frame 1"):
        preprocess_video_frames([noise_image(56, 56), "x"], cfg)  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------
# config


RELEASED = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}


def test_config_defaults_are_released_values():
    cfg = VisionPreprocessConfig()
    assert cfg == VisionPreprocessConfig.from_dict(RELEASED)
    assert cfg.factor == 28
    assert cfg.image_mean == IMAGE_MEAN and cfg.image_std == IMAGE_STD


def test_config_from_transformers_5_layout():
    saved = hf_processor(1234 * 28, 99 * 28 * 28).to_dict()
    cfg = VisionPreprocessConfig.from_dict(json.loads(json.dumps(saved)))
    assert (cfg.min_pixels, cfg.max_pixels) == (1234 * 28, 99 * 28 * 28)
    nested = VisionPreprocessConfig.from_dict({"image_processor": saved}, "processor_config.json")
    assert nested == cfg


def test_config_qwen25_fork_layout_top_level_wins():
    d = {
        "resample": 3,
        "size": {"longest_edge": 12845056, "shortest_edge": 3136},
        "max_pixels": 1003520,
        "some_future_key": [1, 2],
    }
    cfg = VisionPreprocessConfig.from_dict(d)
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 1003520)


@pytest.mark.parametrize(
    ("d", "field"),
    [
        ({"min_pixels": "3136"}, "min_pixels"),
        ({"patch_size": 14.0}, "patch_size"),
        ({"merge_size": True}, "merge_size"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"size": {"longest_edge": "big"}}, "longest_edge"),
        ({"size": {"height": 224, "width": 224}}, "size"),
        ({"size": 224}, "size"),
        ({"do_normalize": False}, "do_normalize"),
        ({"resample": 2}, "resample"),
        ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels"),
        ({"max_pixels": 0}, "max_pixels"),
    ],
)
def test_config_errors_name_source_and_field(d, field):
    with pytest.raises(ConfigError, match=field) as info:
        VisionPreprocessConfig.from_dict(d, "ckpt/preprocessor_config.json")
    assert "ckpt/preprocessor_config.json" in str(info.value)


def test_config_post_init_validation():
    with pytest.raises(ConfigError):
        VisionPreprocessConfig(min_pixels=10, max_pixels=5)
    with pytest.raises(ConfigError):
        VisionPreprocessConfig(image_std=(1.0, 0.0, 1.0))
    cfg = VisionPreprocessConfig(image_mean=[0.5, 0.5, 0.5])  # type: ignore[arg-type]
    assert cfg.image_mean == (0.5, 0.5, 0.5)
    hash(cfg)
    assert math.isclose(cfg.image_std[0], IMAGE_STD[0])


def test_preprocessor_config_round_trips_through_the_released_file():
    from qwenvl.processing.image import VisionPreprocessConfig

    cfg = VisionPreprocessConfig(min_pixels=56 * 56, max_pixels=224 * 224)
    d = cfg.to_hf()
    assert d["image_mean"] == [0.48145466, 0.4578275, 0.40821073]  # the released values
    assert d["processor_class"] == "Qwen2VLProcessor"
    assert VisionPreprocessConfig.from_dict(d, "preprocessor_config.json") == cfg
