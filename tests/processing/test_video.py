"""Tests for qwenvl.processing.video: qwen-vl-utils 0.0.14 sampling and PyAV decoding."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.errors import MediaError
from qwenvl.processing.image import VIDEO_MAX_PIXELS, VisionPreprocessConfig, smart_resize
from qwenvl.processing.policy import MediaPolicy
from qwenvl.processing.video import (
    VIDEO_TOTAL_PIXELS,
    VideoSampling,
    frame_pixel_limits,
    frame_range,
    load_video,
    probe_video,
    sample_indices,
    smart_nframes,
)
from video_clips import H, W
from video_clips import frame_array as _frame_array
from video_clips import index_of as _index_of
from video_clips import make_video as _make_video

av = pytest.importorskip("av")


CFG = VisionPreprocessConfig()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {
        "v25_101": _make_video(d / "v25_101.mp4", 101, 25),
        "v10_60": _make_video(d / "v10_60.mkv", 60, 10),
        "v30_200": _make_video(d / "v30_200.mp4", 200, 30, gop=30),
        "v8_9": _make_video(d / "v8_9.mp4", 9, 8),
    }


@pytest.fixture
def decoded_frames(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Records the frame indices (read back from pixels) handed to preprocessing."""
    import qwenvl.processing.video as video_mod

    seen: list[list[int]] = []
    real = video_mod._preprocess

    def spy(frames: Iterator[Image.Image], *args: object) -> object:
        seen.append([])

        def tap() -> Iterator[Image.Image]:
            for f in frames:  # frames stream in from the decoder
                seen[-1].append(_index_of(f.to_image() if isinstance(f, av.VideoFrame) else f))
                yield f

        return real(tap(), *args)  # type: ignore[arg-type]

    monkeypatch.setattr(video_mod, "_preprocess", spy)
    return seen


def _expected_n(total: int, fps: float, want_fps: float = 2.0, lo: int = 4, hi: int = 768) -> int:
    n = total / fps * want_fps
    n = min(max(n, math.ceil(lo / 2) * 2), math.floor(min(hi, total) / 2) * 2, total)
    return math.floor(n / 2) * 2


def _linspace(start: int, end: int, n: int) -> list[int]:
    return torch.linspace(start, end, n).round().long().tolist()


# ---------------------------------------------------------------------------------------------
# Planner (no decoding)


@pytest.mark.parametrize(
    ("total", "fps", "opts", "expected"),
    [
        (101, 25.0, VideoSampling(), 8),  # 8.08 -> 8
        (60, 10.0, VideoSampling(), 12),
        (9, 8.0, VideoSampling(), 4),  # min_frames wins over 2.25
        (3, 8.0, VideoSampling(), 2),  # fewer frames than min_frames: all frames, even
        (1000, 10.0, VideoSampling(max_frames=51), 50),
        (1000, 30.0, VideoSampling(min_frames=7, fps=0.1), 8),
        (100, 25.0, VideoSampling(fps=100.0), 100),
        (101, 25.0, VideoSampling(nframes=7), 8),  # round(3.5) = 4 -> 8
        (101, 25.0, VideoSampling(nframes=5), 4),  # round(2.5) = 2 (half to even)
        (101, 25.0, VideoSampling(nframes=101), 100),
    ],
)
def test_smart_nframes(total: int, fps: float, opts: VideoSampling, expected: int) -> None:
    assert smart_nframes(opts, total, fps) == expected
    if opts.nframes is None:
        assert expected == _expected_n(total, fps, opts.fps, opts.min_frames, opts.max_frames)


def test_smart_nframes_errors() -> None:
    with pytest.raises(MediaError, match=r"nframes=12 .*10 frames"):
        smart_nframes(VideoSampling(nframes=12), 10, 25.0)
    with pytest.raises(MediaError, match="between 2 and 1"):
        smart_nframes(VideoSampling(), 1, 25.0)
    with pytest.raises(MediaError, match="nframes=1"):
        smart_nframes(VideoSampling(nframes=1), 10, 25.0)


def test_sample_indices_and_range() -> None:
    assert sample_indices(VideoSampling(), 101, 25.0) == _linspace(0, 100, 8)
    assert sample_indices(VideoSampling(nframes=10), 60, 10.0) == _linspace(0, 59, 10)
    # 1.5 s .. 4.2 s at 10 fps -> frames 15..42 (28 frames) -> 4 frames at 2 fps (5.6 -> 4)
    opts = VideoSampling(video_start=1.5, video_end=4.2)
    assert frame_range(opts, 60, 10.0) == (15, 42)
    assert sample_indices(opts, 60, 10.0) == _linspace(15, 42, 4)
    # start ceil'd, end floor'd and clipped to the last frame
    assert frame_range(VideoSampling(video_start=0.01, video_end=100.0), 60, 10.0) == (1, 59)
    assert frame_range(VideoSampling(video_end=2.0), 60, 10.0) == (0, 20)
    with pytest.raises(MediaError, match="outside the video"):
        frame_range(VideoSampling(video_start=6.0), 60, 10.0)
    with pytest.raises(MediaError, match="fewer than 2 frames"):
        frame_range(VideoSampling(video_start=5.95), 60, 10.0)


def test_frame_pixel_limits_and_total_budget() -> None:
    assert VIDEO_TOTAL_PIXELS == pytest.approx(90316800.0)
    opts = VideoSampling()
    # default budget is large: the per-frame VIDEO_MAX_PIXELS cap applies
    assert frame_pixel_limits(opts, 8) == (128 * 784, VIDEO_MAX_PIXELS)
    opts = VideoSampling(total_pixels=100 * 784, min_pixels=4 * 784)
    assert frame_pixel_limits(opts, 10) == (4 * 784, 100 * 784 / 10 * 2)
    # min_pixels * 1.05 floor
    assert frame_pixel_limits(opts, 1000) == (4 * 784, int(4 * 784 * 1.05))
    # the item's max_pixels only lowers the limit
    assert frame_pixel_limits(VideoSampling(max_pixels=200 * 784), 8)[1] == 200 * 784
    assert frame_pixel_limits(VideoSampling(max_pixels=10**9), 8)[1] == VIDEO_MAX_PIXELS


@pytest.mark.parametrize(
    ("nframes", "size", "tokens"),
    [(60, (532, 952), 19380), (530, (168, 308), 17490), (768, (140, 252), 17280)],
)
def test_cookbook_examples(nframes: int, size: tuple[int, int], tokens: int) -> None:
    # Published qwen-vl-utils outputs for a 720x1280 source (notes 3.6).
    opts = VideoSampling(total_pixels=20480 * 28 * 28, min_pixels=16 * 28 * 28)
    lo, hi = frame_pixel_limits(opts, nframes)
    h, w = smart_resize(720, 1280, 28, lo, hi)
    assert (h, w) == size
    assert nframes // 2 * (h // 14) * (w // 14) // 4 == tokens


def test_from_item_validation() -> None:
    item = {"type": "video", "video": "x.mp4", "fps": 1.0, "max_pixels": 1000, "min_frames": 2}
    opts = VideoSampling.from_item(item)
    assert (opts.fps, opts.max_pixels, opts.min_frames, opts.nframes) == (1.0, 1000, 2, None)
    assert VideoSampling.from_item({"nframes": 8}).nframes == 8
    bad = [
        {"fps": 2.0, "nframes": 8},
        {"fps": 0},
        {"fps": "2"},
        {"nframes": 2.5},
        {"nframes": True},
        {"max_frames": 0},
        {"video_start": -1.0},
        {"video_start": 3.0, "video_end": 2.0},
        {"min_pixels": -5},
        {"total_pixels": float("nan")},
        {"resized_height": 100},
    ]
    for d in bad:
        with pytest.raises(MediaError):
            VideoSampling.from_item(d)
    with pytest.raises(MediaError):
        VideoSampling.from_item(["fps"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Decoding


def test_probe(videos: dict[str, Path]) -> None:
    info = probe_video(videos["v25_101"])
    assert (info.fps, info.total_frames, info.width, info.height) == (25.0, 101, W, H)
    assert info.duration == pytest.approx(101 / 25, abs=0.05)
    info = probe_video(str(videos["v10_60"]))  # matroska: count from the duration
    assert (info.fps, info.total_frames) == (10.0, 60)


@pytest.mark.parametrize("name", ["v25_101", "v10_60", "v30_200", "v8_9"])
@pytest.mark.parametrize("seek_gap", [0, 10**6])
def test_load_video_decodes_sampled_frames(
    videos: dict[str, Path],
    decoded_frames: list[list[int]],
    caplog: pytest.LogCaptureFixture,
    name: str,
    seek_gap: int,
) -> None:
    total, fps = {"v25_101": (101, 25), "v10_60": (60, 10), "v30_200": (200, 30), "v8_9": (9, 8)}[
        name
    ]
    with caplog.at_level(logging.DEBUG, logger="qwenvl.processing.video"):
        video, meta = load_video(videos[name], VideoSampling(), CFG, seek_gap=seek_gap)
    n = _expected_n(total, fps)
    expected = _linspace(0, total - 1, n)
    assert meta.frame_indices == expected
    assert decoded_frames == [expected]
    seeks = [r for r in caplog.records if "seeking" in r.getMessage()]
    if seek_gap == 0:
        assert len(seeks) == len(set(expected)) - (1 if expected[0] == 0 else 0)
    else:
        assert not seeks
    assert meta.timestamps == pytest.approx([i / fps for i in expected])
    assert meta.sample_fps == pytest.approx(n / total * fps)
    assert meta.second_per_grid_t == pytest.approx(2 / meta.sample_fps)
    assert video.second_per_grid_t == pytest.approx(meta.second_per_grid_t)
    assert (meta.fps, meta.total_frames) == (fps, total)
    assert video.num_frames == n
    # 64x48 -> smart_resize under the video limits (min 128*28*28 upscales)
    lo, hi = frame_pixel_limits(VideoSampling(), n)
    rh, rw = smart_resize(H, W, 28, lo, hi)
    assert (video.resized_height, video.resized_width) == (rh, rw)
    assert video.grid_thw == (n // 2, rh // 14, rw // 14)
    assert video.pixel_values.shape == (n // 2 * rh // 14 * rw // 14, 3 * 2 * 14 * 14)


def test_load_video_options(videos: dict[str, Path], decoded_frames: list[list[int]]) -> None:
    src = videos["v30_200"]
    _, meta = load_video(src, VideoSampling(nframes=11), CFG, seek_gap=5)
    assert meta.frame_indices == _linspace(0, 199, 12)
    _, meta = load_video(src, VideoSampling(fps=4.0, max_frames=9), CFG)
    assert meta.frame_indices == _linspace(0, 199, 8)
    _, meta = load_video(src, VideoSampling(fps=30.0, min_frames=4, max_frames=768), CFG)
    assert meta.frame_indices == list(range(200))
    opts = VideoSampling(video_start=2.0, video_end=5.0, fps=2.0)
    _, meta = load_video(src, opts, CFG, seek_gap=10)
    assert meta.frame_indices == _linspace(60, 150, 6)
    assert meta.sample_fps == pytest.approx(6 / 91 * 30)
    assert meta.timestamps[0] == pytest.approx(2.0) and meta.timestamps[-1] == pytest.approx(5.0)
    assert decoded_frames[1:] == [
        _linspace(0, 199, 8),
        list(range(200)),
        _linspace(60, 150, 6),
    ]
    # total_pixels budget and explicit sizes
    video, _ = load_video(src, VideoSampling(nframes=8, total_pixels=8 * 784, min_pixels=784), CFG)
    assert (video.resized_height, video.resized_width) == smart_resize(H, W, 28, 784, 2 * 784)
    opts = VideoSampling(nframes=4, resized_height=56, resized_width=84)
    video, _ = load_video(src, opts, CFG)
    assert (video.resized_height, video.resized_width) == (56, 84)


def test_frame_list(tmp_path: Path) -> None:
    paths = []
    for i in range(5):
        p = tmp_path / f"f{i}.png"
        Image.fromarray(_frame_array(i)).save(p)
        paths.append(str(p))
    video, meta = load_video(paths, VideoSampling(fps=4.0), CFG)
    assert meta.frame_indices == list(range(5))
    assert meta.timestamps == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert meta.sample_fps == 4.0 and meta.second_per_grid_t == 0.5
    assert video.num_frames == 6  # padded to even by repeating the last frame
    assert video.grid_thw[0] == 3
    image = Image.fromarray(_frame_array(1))
    _, meta = load_video([image, image], None, CFG)
    assert meta.sample_fps == 2.0
    with pytest.raises(MediaError):
        load_video([], VideoSampling(), CFG)
    with pytest.raises(MediaError):
        load_video([str(tmp_path / "missing.png")], VideoSampling(), CFG)


def test_bytes_data_uri_and_file_url(videos: dict[str, Path]) -> None:
    data = videos["v10_60"].read_bytes()
    _, meta = load_video(data, VideoSampling(nframes=4), CFG)
    assert meta.frame_indices == _linspace(0, 59, 4)
    uri = "data:video/x-matroska;base64," + base64.b64encode(data).decode()
    _, meta2 = load_video(uri, VideoSampling(nframes=4), CFG)
    assert meta2.frame_indices == meta.frame_indices
    _, meta3 = load_video(videos["v10_60"].as_uri(), VideoSampling(nframes=4), CFG)
    assert meta3.frame_indices == meta.frame_indices
    with pytest.raises(MediaError, match="expected video"):
        load_video("data:image/png;base64," + base64.b64encode(data).decode(), None, CFG)
    with pytest.raises(MediaError, match="max_bytes"):
        load_video(data, None, CFG, MediaPolicy(max_bytes=100))
    with pytest.raises(MediaError, match="disabled"):
        load_video(videos["v10_60"], None, CFG, MediaPolicy(allow_local_files=False))


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    finally:
        server.shutdown()
        server.server_close()


def test_http_source(
    http_root: tuple[str, Path], videos: dict[str, Path], decoded_frames: list[list[int]]
) -> None:
    base, root = http_root
    (root / "clip.mp4").write_bytes(videos["v25_101"].read_bytes())
    _, meta = load_video(f"{base}/clip.mp4", VideoSampling(), CFG)
    assert meta.frame_indices == _linspace(0, 100, 8)
    assert decoded_frames == [meta.frame_indices]
    assert probe_video(f"{base}/clip.mp4").total_frames == 101
    with pytest.raises(MediaError, match="404"):
        load_video(f"{base}/missing.mp4", None, CFG)
    with pytest.raises(MediaError, match="max_bytes"):
        load_video(f"{base}/clip.mp4", None, CFG, MediaPolicy(max_bytes=1000))


def test_unreachable_url() -> None:
    with pytest.raises(MediaError, match="cannot reach"):
        load_video("http://127.0.0.1:9/v.mp4", None, CFG, MediaPolicy(timeout_s=2.0))


def test_errors(tmp_path: Path, videos: dict[str, Path]) -> None:
    png = io.BytesIO()
    Image.fromarray(_frame_array(3)).save(png, "PNG")
    with pytest.raises(MediaError, match="image"):
        load_video(png.getvalue(), None, CFG)
    (tmp_path / "x.png").write_bytes(png.getvalue())
    with pytest.raises(MediaError, match="image"):
        probe_video(tmp_path / "x.png")
    rng = np.random.default_rng(0)
    with pytest.raises(MediaError, match="not a video"):
        load_video(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), None, CFG)
    with pytest.raises(MediaError, match="not found"):
        load_video(tmp_path / "missing.mp4", None, CFG)
    with pytest.raises(MediaError, match="scheme"):
        load_video("ftp://example.com/v.mp4", None, CFG)
    with pytest.raises(MediaError, match="unsupported video source"):
        load_video(12, None, CFG)  # type: ignore[arg-type]
    # an audio-only file: no video stream
    audio = tmp_path / "a.wav"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), np.int16), format="s16", layout="mono"
        )
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(MediaError, match="no video stream"):
        load_video(audio, None, CFG)
    # a truncated file whose header survives: the stream ends early
    data = videos["v10_60"].read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    for gap in (0, 10**6):
        with pytest.raises(MediaError, match="truncated or corrupt"):
            load_video(tmp_path / "cut.mkv", VideoSampling(), CFG, seek_gap=gap)
    # a truncated mp4 (index at the end) cannot even be opened
    data = videos["v25_101"].read_bytes()
    with pytest.raises(MediaError, match="corrupt or truncated"):
        load_video(data[: len(data) // 2], None, CFG)
    # range outside the video, nframes larger than the video
    with pytest.raises(MediaError, match="outside the video"):
        load_video(videos["v10_60"], VideoSampling(video_start=7.0), CFG)
    with pytest.raises(MediaError, match="nframes=70"):
        load_video(videos["v10_60"], VideoSampling(nframes=70), CFG)


def test_local_videos_stay_under_the_allowed_folder(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    inside = _make_video(allowed / "in.mp4", 8, 4)
    outside = _make_video(tmp_path / "out.mp4", 8, 4)
    (allowed / "link.mp4").symlink_to(outside)  # a symlink must not escape the folder
    policy = MediaPolicy(local_media_root=str(allowed))
    video, _ = load_video(str(inside), VideoSampling(nframes=2), policy=policy)
    assert video.grid_thw[0] == 1
    for escape in (str(outside), f"file://{outside}", str(allowed / "link.mp4")):
        with pytest.raises(MediaError, match="outside the allowed local media path"):
            load_video(escape, VideoSampling(nframes=2), policy=policy)
