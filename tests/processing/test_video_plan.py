"""Tests for the video token-budget planner (``plan_video``) and its use in ``load_video`` and
the ``Processor``. Expected sizes and counts are worked out by hand in the comments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl.errors import MediaError
from qwenvl.processing import video as video_mod
from qwenvl.processing.image import VisionPreprocessConfig, smart_resize
from qwenvl.processing.video import (
    VideoInfo,
    VideoSampling,
    frame_pixel_limits,
    load_video,
    plan_video,
    sample_indices,
)
from qwenvl.processing.video_frames import preprocess_video_frames
from video_clips import frame_array as _frame
from video_clips import index_of as _index_of
from video_clips import make_video

av = pytest.importorskip("av")

CFG = VisionPreprocessConfig()
# 20 minutes of 1280x720 at 30 fps (header facts only: nothing is decoded).
LONG = VideoInfo(fps=30.0, total_frames=36000, duration=1200.0, width=1280, height=720)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 frames at 30 fps, 64x48, a keyframe every 30 frames."""
    return make_video(tmp_path_factory.mktemp("plan") / "v30_200.mp4", 200, 30, gop=30)


# --- pure planning ---------------------------------------------------------------------------
def test_unbounded_plan_is_qwen_vl_utils():
    # 2400 frames at 2 fps capped to 768; per frame 90316800 / 768 * 2 = 235200 px
    # -> beta = sqrt(921600 / 235200): 720 -> 12 * 28 = 336, 1280 -> 23 * 28 = 644;
    # 384 groups * 12 * 23 = 105984 tokens.
    for budget in (None, 105984, 10**9):
        plan = plan_video(LONG, VideoSampling(), CFG, budget)
        assert list(plan.frame_indices) == sample_indices(VideoSampling(), 36000, 30.0)
        assert plan.nframes == 768
        assert (plan.resized_height, plan.resized_width) == (336, 644)
        assert (plan.resized_height, plan.resized_width) == smart_resize(
            720, 1280, 28, *frame_pixel_limits(VideoSampling(), 768)
        )
        assert plan.num_tokens == 105984
        assert plan.sample_fps == 768 / 36000 * 30  # qwen-vl-utils' rate, unchanged
        assert plan.second_per_grid_t == 2 / plan.sample_fps
        assert not plan.reduced


def test_budget_lowers_pixels_first():
    # 80000 // 384 groups = 208 tokens a group -> max_pixels 208 * 784 = 163072:
    # beta = sqrt(921600 / 163072) = 2.377: 720 -> 10 * 28 = 280, 1280 -> 19 * 28 = 532;
    # 384 * 10 * 19 = 72960 tokens, same 768 frames.
    plan = plan_video(LONG, VideoSampling(max_video_tokens=80000), CFG)
    assert plan.nframes == 768
    assert list(plan.frame_indices) == sample_indices(VideoSampling(), 36000, 30.0)
    assert (plan.resized_height, plan.resized_width, plan.num_tokens) == (280, 532, 72960)
    assert plan.sample_fps == 768 / 36000 * 30
    assert plan.reduced
    text = plan.describe()
    assert "768 of 36000 frames" in text and "280x532" in text and "72960 tokens" in text
    assert "budget 80000" in text and "105984 tokens" in text


def test_budget_stops_at_the_min_pixels_floor():
    # 50000 // 384 = 130 tokens a group = 101920 px < int(100352 * 1.05) = 105369, so the
    # floor applies: beta = sqrt(921600 / 105369) = 2.957: 720 -> 8 * 28, 1280 -> 15 * 28;
    # 384 * 8 * 15 = 46080 tokens.
    plan = plan_video(LONG, VideoSampling(), CFG, 50000)
    assert (plan.nframes, plan.resized_height, plan.resized_width) == (768, 224, 420)
    assert plan.num_tokens == 46080


def test_budget_then_lowers_frames():
    # At the floor (224x420, 120 tokens a group) 10000 tokens hold 83 groups = 166 frames;
    # 83 * 120 = 9960 tokens.
    plan = plan_video(LONG, VideoSampling(max_video_tokens=10000), CFG)
    assert plan.nframes == 166
    assert list(plan.frame_indices) == torch.linspace(0, 35999, 166).round().long().tolist()
    assert (plan.resized_height, plan.resized_width, plan.num_tokens) == (224, 420, 9960)
    # the real spacing of the sampled frames: (35999 / 165) frames at 30 fps, 2 per group
    assert plan.second_per_grid_t == pytest.approx(2 * 35999 / 165 / 30, rel=1e-12)
    assert plan.sample_fps == pytest.approx(165 * 30 / 35999, rel=1e-12)


def test_two_frames_refit_to_the_budget():
    # 200 tokens: 1 group at the floor (120 tokens), then the size is re-fitted for 2 frames:
    # max_pixels 200 * 784 = 156800: beta = 2.424: 720 -> 10 * 28, 1280 -> 18 * 28; 180 tokens.
    plan = plan_video(LONG, VideoSampling(nframes=100), CFG, 200)
    assert list(plan.frame_indices) == [0, 35999]
    assert (plan.resized_height, plan.resized_width, plan.num_tokens) == (280, 504, 180)
    assert plan.second_per_grid_t == pytest.approx(2 * 35999 / 30)


def test_budget_follows_the_selected_range():
    # video_start=60 s, video_end=120 s: frames 1800..3600, 121 frames at 2 fps -> 120 frames;
    # per frame min(602112, 90316800 / 120 * 2) -> 720x1280 is 26x46 -> 728x1288 > 602112:
    # beta = sqrt(921600 / 602112) = 1.237: 720 -> 20 * 28 = 560, 1280 -> 36 * 28 = 1008;
    # 60 * 20 * 36 = 43200 tokens. Budget 6000: 6000 // 60 = 100 tokens a group = 78400 px
    # < the floor -> 224x420 (120 a group) does not fit 60 groups; 50 groups = 100 frames.
    opts = VideoSampling(video_start=60, video_end=120, max_video_tokens=6000)
    plan = plan_video(LONG, opts, CFG)
    assert plan.default_nframes == 120 and plan.default_tokens == 43200
    assert (plan.nframes, plan.resized_height, plan.resized_width) == (100, 224, 420)
    assert plan.num_tokens == 6000
    assert plan.frame_indices[0] == 1800 and plan.frame_indices[-1] == 3600
    assert list(plan.frame_indices) == torch.linspace(1800, 3600, 100).round().long().tolist()
    assert plan.second_per_grid_t == pytest.approx(2 * 1800 / 99 / 30)


def test_explicit_size_only_drops_frames():
    # resized 280x504: 10 * 18 = 180 tokens a group; 1000 // 180 = 5 groups = 10 frames.
    opts = VideoSampling(resized_height=280, resized_width=504, max_video_tokens=1000)
    plan = plan_video(LONG, opts, CFG)
    assert (plan.nframes, plan.resized_height, plan.resized_width) == (10, 280, 504)
    assert plan.num_tokens == 900


def test_cannot_fit_says_by_how_much():
    # 2 frames at the floor 224x420 need 8 * 15 = 120 tokens; the budget is 100.
    with pytest.raises(MediaError) as e:
        plan_video(LONG, VideoSampling(max_video_tokens=100), CFG)
    msg = str(e.value)
    assert "100 tokens" in msg and "224x420" in msg and "need 120 tokens" in msg
    assert "20 more than the budget" in msg


def test_budget_is_validated():
    for bad in (0, -5, 2.5, True, "10"):
        with pytest.raises(MediaError, match="max_video_tokens"):
            VideoSampling(max_video_tokens=bad)
    with pytest.raises(MediaError, match="max_video_tokens"):
        plan_video(LONG, VideoSampling(), CFG, 0)


# --- load_video ------------------------------------------------------------------------------
def test_load_video_unbounded_budget_is_identical(clip):
    before, meta_before = load_video(clip, VideoSampling(), CFG)
    after, meta_after = load_video(clip, VideoSampling(max_video_tokens=10**6), CFG)
    assert torch.equal(before.pixel_values, after.pixel_values)
    assert before.grid_thw == after.grid_thw and before.num_tokens == after.num_tokens
    assert before.second_per_grid_t == after.second_per_grid_t
    assert meta_before.frame_indices == meta_after.frame_indices
    assert meta_before.timestamps == meta_after.timestamps
    # 200 frames at 30 fps -> 13.3 -> 12 frames; 64x48 scales up to min_pixels: 280x392.
    assert meta_before.frame_indices == torch.linspace(0, 199, 12).round().long().tolist()
    assert (before.resized_height, before.resized_width) == (280, 392)
    assert before.num_tokens == meta_before.num_tokens == 6 * 10 * 14
    assert meta_before.plan is not None and "840 tokens" in meta_before.plan


def test_load_video_timestamps_are_the_decoded_frames(clip, monkeypatch):
    # Budget 500 at 140 tokens a group (280x392 is also the floor): 3 groups = 6 frames,
    # linspace(0, 199, 6) = 0, 39.8, 79.6, 119.4, 159.2, 199 -> 0, 40, 80, 119, 159, 199.
    seen: list[int] = []
    real = video_mod._preprocess

    def spy(frames, *args):
        def tap():
            for f in frames:  # frames stream in from the decoder
                seen.append(_index_of(f.to_image() if isinstance(f, av.VideoFrame) else f))
                yield f

        return real(tap(), *args)

    monkeypatch.setattr(video_mod, "_preprocess", spy)
    video, meta = load_video(clip, VideoSampling(max_video_tokens=500), CFG)
    expected = [0, 40, 80, 119, 159, 199]
    assert seen == expected == meta.frame_indices
    assert meta.timestamps == [i / 30 for i in expected]
    assert video.num_tokens == meta.num_tokens == 420 <= 500
    assert video.grid_thw == (3, 20, 28)
    assert video.second_per_grid_t == meta.second_per_grid_t
    assert meta.second_per_grid_t == pytest.approx(2 * (199 / 5) / 30)
    assert meta.max_video_tokens == 500


def test_load_video_too_small_budget_decodes_nothing(clip, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded a frame")

    monkeypatch.setattr(video_mod, "_decode_indices", fail)
    with pytest.raises(MediaError, match=r"need 140 tokens, 40 more than the budget"):
        load_video(clip, VideoSampling(max_video_tokens=100), CFG)


def test_frame_list_follows_the_budget():
    frames = [Image.fromarray(_frame(i)) for i in range(10)]
    # all 10 at 280x392 = 5 * 140 = 700 tokens; budget 300 -> 2 groups: linspace(0, 9, 4).
    full, meta_full = load_video(frames, VideoSampling(), CFG)
    assert full.num_tokens == 700 and meta_full.frame_indices == list(range(10))
    video, meta = load_video(frames, VideoSampling(fps=2, max_video_tokens=300), CFG)
    assert meta.frame_indices == [0, 3, 6, 9]
    assert meta.timestamps == [0.0, 1.5, 3.0, 4.5]
    assert video.num_tokens == 280 and video.grid_thw == (2, 20, 28)
    assert video.second_per_grid_t == pytest.approx(3.0)  # two frames 1.5 s apart
    # the kept frames are the first, 4th, 7th and 10th: compare with them loaded directly
    direct, _ = load_video([frames[i] for i in (0, 3, 6, 9)], VideoSampling(), CFG)
    assert torch.equal(direct.pixel_values, video.pixel_values)


# --- Processor -------------------------------------------------------------------------------
def test_processor_budgets(checkpoints, clip):
    from qwenvl.checkpoint import load_config
    from qwenvl.processing.prompt import Processor

    ckpt = checkpoints("qwen2_vl")
    processor = Processor.from_pretrained(ckpt, load_config(ckpt))
    assert processor.process_video(str(clip)).num_tokens == 840  # unlimited by default
    processor.max_video_tokens = 500  # the default when the item sets none: 6 frames
    assert processor.process_video(str(clip)).num_tokens == 420
    assert processor.process_video(str(clip), max_video_tokens=300).num_tokens == 280
    message = {
        "role": "user",
        "content": [
            {"type": "video", "video": str(clip), "max_video_tokens": 700},  # beats the default
            {"type": "video", "video": str(clip)},
            {"type": "text", "text": "what happens?"},
        ],
    }
    inputs = processor.prepare_chat([message])
    assert [v.num_tokens for v in inputs.videos] == [700, 420]
    assert inputs.token_ids.count(processor.config.video_token_id) == 1120
    capped = processor.prepare_chat([message], max_video_tokens=300)  # the context left wins
    assert [v.num_tokens for v in capped.videos] == [280, 280]
    assert "budget 300" in capped.videos[0].metadata.plan
    with pytest.raises(MediaError, match=r"messages\[0\].content\[0\].*need 140 tokens"):
        processor.prepare_chat([message], max_video_tokens=100)


def test_frame_resize_modes(clip):
    # "pil" equals preprocessing the decoded frames as images; "swscale" is within a few levels.
    opts = VideoSampling(nframes=6)
    pil, meta = load_video(clip, opts, CFG, frame_resize="pil")
    fast, _ = load_video(clip, opts, CFG)
    with av.open(str(clip)) as c:
        decoded = [f.to_image() for f in c.decode(video=0)]
    frames = [decoded[i] for i in meta.frame_indices]
    area = pil.resized_height * pil.resized_width
    ref = preprocess_video_frames(
        frames, CFG, min_pixels=area, max_pixels=area, resized_height=280, resized_width=392
    )
    assert torch.equal(pil.pixel_values, ref.pixel_values)
    # one uint8 level is 1 / 255 / std (~0.27) ~ 0.015 after normalisation
    diff = (fast.pixel_values - pil.pixel_values).abs()
    assert diff.mean().item() < 1.5 * 0.015
    assert fast.grid_thw == pil.grid_thw and fast.num_tokens == pil.num_tokens
    with pytest.raises(MediaError, match="frame_resize"):
        load_video(clip, opts, CFG, frame_resize="bilinear")


def test_no_seek_within_a_keyframe_interval(clip, caplog, monkeypatch):
    # linspace(0, 199, 20): frames 10-11 apart. With seek_gap=5 the first gap (nothing known
    # about keyframes yet) seeks; that seek lands on keyframe 0, and from then on the keyframe
    # interval seen (>= 11 frames decoded since a keyframe, then the real interval) is longer
    # than the gaps, so a seek could not skip anything: decode forward.
    with av.open(str(clip)) as c:
        keys = [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]
    if min(b - a for a, b in zip(keys, keys[1:])) <= 11:
        pytest.skip(f"the encoder placed keyframes closer than the gaps: {keys}")
    seen: list[int] = []
    real = video_mod._preprocess

    def spy(frames, *args):
        def tap():
            for f in frames:
                seen.append(_index_of(f.to_image()))
                yield f

        return real(tap(), *args)

    monkeypatch.setattr(video_mod, "_preprocess", spy)
    with caplog.at_level("DEBUG", logger="qwenvl.processing.video"):
        _, meta = load_video(clip, VideoSampling(nframes=20), CFG, seek_gap=5)
    assert seen == meta.frame_indices == torch.linspace(0, 199, 20).round().long().tolist()
    seeks = [r.getMessage() for r in caplog.records if "seeking" in r.getMessage()]
    assert seeks == [f"video file {clip}: seeking to frame 10"]
