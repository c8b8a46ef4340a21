"""Video loading and frame sampling, matching qwen-vl-utils 0.0.14.

Planning (pure, no decoding): ``smart_nframes`` picks how many frames to sample, ``sample_indices``
where (``linspace(start, end, n).round()`` over the ``video_start``/``video_end`` range), and
``frame_pixel_limits`` the per-frame pixel limits under the ``total_pixels`` budget.

Decoding uses PyAV (``pip install qwenvl[video]``) with threaded decoding and keeps only the
sampled frames in memory: it decodes forward when the next sampled frame is near and seeks to the
preceding keyframe when it is far. Sampled frames then go through the same PIL bicubic resize and
normalisation as images (``preprocess_video_frames``). qwen-vl-utils resizes video frames with
torchvision bicubic + antialias instead, so pixel values differ slightly from the reference; the
sizes, frame indices and token counts are identical.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from qwenvl.errors import MediaError
from qwenvl.processing.image import (
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    ProcessedVideo,
    VisionPreprocessConfig,
    preprocess_video_frames,
)
from qwenvl.processing.media import (
    DEFAULT_POLICY,
    MediaPolicy,
    _file_url_to_path,
    _short,
    fetch_url,
    load_image,
    parse_data_uri,
)

logger = logging.getLogger(__name__)

FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
# qwen-vl-utils 0.0.14: MODEL_SEQ_LEN (128000) * 28 * 28 * 0.9, a float.
VIDEO_TOTAL_PIXELS = 128000 * 28 * 28 * 0.9

# Decode forward (instead of seeking) when the next sampled frame is at most this many frames on.
DEFAULT_SEEK_GAP = 64
# Containers PyAV opens for still images; they are not videos.
_IMAGE_FORMATS = re.compile(r"^(image2|.*_pipe|apng|gif|webp)$")
_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")

VideoSource = str | bytes | bytearray | os.PathLike[str] | Sequence[Any]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class VideoSampling:
    """Per-item video options, as in a qwen-vl-utils ``{"type": "video", ...}`` content item.

    ``nframes`` (rounded to an even count) wins over ``fps``; giving both in an item is an error.
    ``video_start``/``video_end`` are seconds. ``max_pixels`` caps the per-frame limit computed
    from ``total_pixels``; ``resized_height``/``resized_width`` (both or neither) fix the size.
    """

    fps: float = FPS
    nframes: int | None = None
    min_frames: int = FPS_MIN_FRAMES
    max_frames: int = FPS_MAX_FRAMES
    video_start: float | None = None
    video_end: float | None = None
    min_pixels: float = VIDEO_MIN_PIXELS
    max_pixels: float | None = None
    total_pixels: float = VIDEO_TOTAL_PIXELS
    resized_height: float | None = None
    resized_width: float | None = None

    def __post_init__(self) -> None:
        positive = ("fps", "min_pixels", "total_pixels")
        for name in positive + ("max_pixels", "resized_height", "resized_width"):
            value = getattr(self, name)
            if value is None and name not in positive:
                continue
            if not _is_num(value) or value <= 0:
                raise MediaError(f"video option {name!r} must be a positive number, got {value!r}")
        for name in ("nframes", "min_frames", "max_frames"):
            value = getattr(self, name)
            if value is None and name == "nframes":
                continue
            if not _is_int(value) or value <= 0:
                raise MediaError(f"video option {name!r} must be a positive int, got {value!r}")
        for name in ("video_start", "video_end"):
            value = getattr(self, name)
            if value is not None and (not _is_num(value) or value < 0):
                raise MediaError(
                    f"video option {name!r} must be a non-negative number of seconds, got {value!r}"
                )
        if (
            self.video_start is not None
            and self.video_end is not None
            and self.video_start >= self.video_end
        ):
            raise MediaError(
                f"video_start ({self.video_start}) must be before video_end ({self.video_end})"
            )
        if (self.resized_height is None) != (self.resized_width is None):
            raise MediaError("resized_height and resized_width must be given together")

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> VideoSampling:
        """Read the sampling options of a content item; other keys (``video``, ``type``) are
        ignored.

        Raises:
            MediaError: a bad type or range, or both ``fps`` and ``nframes``.
        """
        if not isinstance(item, Mapping):
            raise MediaError(f"a video item must be a dict, got {type(item).__name__}")
        if item.get("fps") is not None and item.get("nframes") is not None:
            raise MediaError("a video item may set 'fps' or 'nframes', not both")
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in item.items() if k in names and v is not None})


def _floor_by(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def _ceil_by(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def smart_nframes(opts: VideoSampling, total_frames: int, video_fps: float) -> int:
    """Number of frames to sample, exactly as qwen-vl-utils 0.0.14 (always even).

    ``total_frames`` is the number of frames in the selected range and ``video_fps`` the source
    frame rate.

    Raises:
        MediaError: the result is not in ``[2, total_frames]`` (e.g. ``nframes`` larger than the
            video, or a video shorter than 2 frames).
    """
    if opts.nframes is not None:
        n: float = round(opts.nframes / FRAME_FACTOR) * FRAME_FACTOR
        if not FRAME_FACTOR <= n <= total_frames:
            raise MediaError(
                f"nframes={opts.nframes} (rounded to {n}) must be between {FRAME_FACTOR} and the "
                f"{total_frames} frames of the video"
            )
        return int(n)
    min_f = _ceil_by(opts.min_frames, FRAME_FACTOR)
    max_f = _floor_by(min(opts.max_frames, total_frames), FRAME_FACTOR)
    n = total_frames / video_fps * opts.fps
    n = min(min(max(n, min_f), max_f), total_frames)
    n = _floor_by(n, FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise MediaError(
            f"cannot sample a video of {total_frames} frames at {video_fps:g} fps with fps="
            f"{opts.fps:g}, min_frames={opts.min_frames}, max_frames={opts.max_frames}: got "
            f"{n} frames, need between {FRAME_FACTOR} and {total_frames}"
        )
    return int(n)


def frame_range(opts: VideoSampling, total_frames: int, video_fps: float) -> tuple[int, int]:
    """First and last frame index (inclusive) selected by ``video_start``/``video_end``.

    As qwen-vl-utils: start = ceil(start_s * fps), end = min(floor(end_s * fps), total - 1), with
    the seconds clipped to the video. A range that lies outside the video is an error.

    Raises:
        MediaError: the range starts at or after the end of the video, or selects < 2 frames.
    """
    if total_frames <= 0:
        raise MediaError("the video has no frames")
    if opts.video_start is None and opts.video_end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    start, end = 0, total_frames - 1
    if opts.video_start is not None:
        if opts.video_start >= duration:
            raise MediaError(
                f"video_start={opts.video_start:g}s is outside the video ({duration:g}s long)"
            )
        start = math.ceil(max(0.0, min(opts.video_start, duration)) * video_fps)
    if opts.video_end is not None:
        end = min(math.floor(max(0.0, min(opts.video_end, duration)) * video_fps), end)
    if start >= end:
        raise MediaError(
            f"video_start/video_end ({opts.video_start}, {opts.video_end}) select frames "
            f"{start}..{end} of a {total_frames}-frame video ({duration:g}s): fewer than 2 frames"
        )
    return start, end


def sample_indices(opts: VideoSampling, total_frames: int, video_fps: float) -> list[int]:
    """Indices of the frames to sample: ``linspace(start, end, n).round()`` as qwen-vl-utils.

    Raises:
        MediaError: see ``frame_range`` and ``smart_nframes``.
    """
    start, end = frame_range(opts, total_frames, video_fps)
    n = smart_nframes(opts, end - start + 1, video_fps)
    return torch.linspace(start, end, n).round().long().tolist()


def frame_pixel_limits(opts: VideoSampling, nframes: int) -> tuple[float, float]:
    """Per-frame ``(min_pixels, max_pixels)`` for ``nframes`` sampled frames (qwen-vl-utils).

    ``max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / n * 2), int(min_pixels * 1.05))``,
    then capped by the item's own ``max_pixels``.
    """
    if nframes <= 0:
        raise MediaError(f"nframes must be positive, got {nframes}")
    min_pixels = opts.min_pixels
    max_pixels = max(
        min(VIDEO_MAX_PIXELS, opts.total_pixels / nframes * FRAME_FACTOR),
        int(min_pixels * 1.05),
    )
    if opts.max_pixels is not None:
        max_pixels = min(opts.max_pixels, max_pixels)
    return min_pixels, max_pixels


# ---------------------------------------------------------------------------------------------
# Containers


@dataclass
class VideoInfo:
    """Header facts of a video stream."""

    fps: float
    total_frames: int
    duration: float  # seconds
    width: int
    height: int


@dataclass
class VideoMetadata:
    """How a video was sampled; ``second_per_grid_t`` feeds Qwen2.5-VL's time axis."""

    fps: float  # source frame rate (for a frame list: the rate it is assumed to have)
    duration: float  # seconds
    total_frames: int
    frame_indices: list[int]
    timestamps: list[float]  # seconds of each sampled frame
    sample_fps: float  # len(frame_indices) / total_frames * fps (for the selected range)
    second_per_grid_t: float  # temporal_patch_size / sample_fps


def _import_av() -> Any:
    try:
        import av
    except ImportError as e:
        raise MediaError(
            "decoding video files needs PyAV: pip install qwenvl[video] (or pip install av)"
        ) from e
    return av


def _resolve(source: Any, policy: MediaPolicy) -> tuple[str | io.BytesIO, str]:
    """A path or an in-memory file for PyAV, and a description for messages.

    Local files are opened in place (streamed, not read into memory), so ``max_bytes`` limits
    downloads and inline data only.
    """
    if isinstance(source, (bytes, bytearray)):
        if len(source) > policy.max_bytes:
            raise MediaError(
                f"video bytes are {len(source)} bytes, over the limit of {policy.max_bytes} "
                "bytes (MediaPolicy.max_bytes)"
            )
        return io.BytesIO(bytes(source)), "video bytes"
    path: Path | None = None
    if isinstance(source, os.PathLike):
        path = Path(source)
    elif isinstance(source, str):
        text = source.strip()
        if not text:
            raise MediaError("empty video source string")
        if text[:5].lower() == "data:":
            return io.BytesIO(parse_data_uri(text, policy, "video")), "data URI video"
        match = _URL_SCHEME.match(text)
        if match:
            scheme = match.group(1).lower()
            if scheme in ("http", "https"):
                return io.BytesIO(fetch_url(text, policy)), f"video at {_short(text)}"
            if scheme != "file":
                raise MediaError(
                    f"unsupported URL scheme {scheme!r} in {_short(text)}; use http(s)://, "
                    "file://, data:video/...;base64, or a local path"
                )
            path = _file_url_to_path(text)
        else:
            path = Path(source)
    else:
        raise MediaError(
            f"unsupported video source of type {type(source).__name__}; expected a path, a URL, "
            "a data URI, bytes or a list of frames"
        )
    if not policy.allow_local_files:
        raise MediaError(f"local files are disabled by the media policy: {_short(str(path))}")
    if not path.is_file():
        raise MediaError(f"video file not found: {_short(str(path))}")
    return str(path), f"video file {_short(str(path))}"


def _open(source: Any, policy: MediaPolicy) -> tuple[Any, Any, VideoInfo, str]:
    """Open a container -> (container, video stream, info, description). Caller closes."""
    av = _import_av()
    target, what = _resolve(source, policy)
    try:
        container = av.open(target, mode="r")
    except Exception as e:
        raise MediaError(
            f"{what} is not a video FFmpeg can read, or it is corrupt or truncated "
            f"({type(e).__name__}: {e})"
        ) from e
    try:
        fmt = container.format.name
        if _IMAGE_FORMATS.match(fmt):
            raise MediaError(f"{what} is an image ({fmt}), not a video")
        if not container.streams.video:
            raise MediaError(f"{what} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if not fps > 0:
            raise MediaError(f"{what}: cannot determine the frame rate")
        duration = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        total = int(stream.frames) if stream.frames else round(duration * fps)
        if total <= 0:
            raise MediaError(f"{what} has no video frames")
        if duration <= 0:
            duration = total / fps
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise MediaError(f"{what}: video stream has no frame size")
        if width * height > policy.max_image_pixels:
            raise MediaError(
                f"{what}: frames are {width}x{height} = {width * height} pixels, over the limit "
                f"of {policy.max_image_pixels} pixels (MediaPolicy.max_image_pixels)"
            )
        info = VideoInfo(fps=fps, total_frames=total, duration=duration, width=width, height=height)
    except BaseException:
        container.close()
        raise
    return container, stream, info, what


def probe_video(source: Any, policy: MediaPolicy = DEFAULT_POLICY) -> VideoInfo:
    """Frame rate, frame count, duration and size from the container/stream header only.

    Raises:
        MediaError: unreadable source, not a video, no video stream or no frames.
    """
    container, _, info, _ = _open(source, policy)
    container.close()
    return info


def _frame_index(frame: Any, stream: Any, fps: float) -> int | None:
    if frame.pts is None or stream.time_base is None:
        return None
    start = stream.start_time or 0
    return round(float((frame.pts - start) * stream.time_base) * fps)


def _next_at_or_after(
    frames: Any, stream: Any, fps: float, target: int, pos: int | None
) -> tuple[int, Any, int] | None:
    """Decode forward to the first frame whose index is >= target.

    Returns ``(index, frame, frames_seen)`` or None when the stream ends. The index comes from the
    frame's pts (or from counting when there is none).
    """
    seen = 0
    for frame in frames:
        seen += 1
        index = _frame_index(frame, stream, fps)
        if index is None:
            index = pos if pos is not None else 0
        pos = index + 1
        if index >= target:
            return index, frame, seen
    return None


def _decode_indices(
    container: Any,
    stream: Any,
    info: VideoInfo,
    wanted: list[int],
    what: str,
    seek_gap: int,
) -> dict[int, Image.Image]:
    """Decode only the frames at ``wanted`` indices, as RGB PIL images keyed by index."""
    out: dict[int, Image.Image] = {}
    stream.thread_type = "AUTO"
    start_pts = stream.start_time or 0
    frames: Any = None
    pos: int | None = 0  # index of the next frame the decoder returns (None: unknown)
    last: tuple[int, Image.Image] | None = None
    try:
        for target in sorted(set(wanted)):
            if last is not None and last[0] >= target:
                out[target] = last[1]  # e.g. a gap in the pts: reuse the nearest later frame
                continue
            seeked = False
            if frames is None and target <= seek_gap:
                frames = container.decode(stream)
                pos = 0
            elif frames is None or pos is None or target - pos > seek_gap:
                # Seek to the keyframe at or before the target, then decode forward.
                offset = start_pts + int(target / info.fps / stream.time_base)
                logger.debug("%s: seeking to frame %d", what, target)
                container.seek(offset, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
                pos, seeked = None, True
            found = _next_at_or_after(frames, stream, info.fps, target, pos)
            if seeked and (found is None or (found[2] == 1 and found[0] > target)):
                # The seek landed after the target: decode from the start instead.
                logger.debug(
                    "%s: seek for frame %d overshot; decoding from the start", what, target
                )
                container.seek(start_pts, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
                found = _next_at_or_after(frames, stream, info.fps, target, 0)
            if found is None:
                tolerance = max(2, info.total_frames // 50)
                if last is not None and target >= info.total_frames - tolerance:
                    # Header frame counts can overshoot by a frame or two: reuse the last frame.
                    out[target] = last[1]
                    continue
                raise MediaError(
                    f"{what} is truncated or corrupt: the stream ended before frame {target} of "
                    f"{info.total_frames}"
                )
            index, frame, _ = found
            last = (index, frame.to_image())
            out[target] = last[1]
            pos = index + 1
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(
            f"{what}: cannot decode the video stream, it is corrupt or truncated "
            f"({type(e).__name__}: {e})"
        ) from e
    if not out:
        raise MediaError(f"{what}: no frame could be decoded")
    return out


def _metadata(
    indices: list[int], fps: float, total: int, duration: float, sample_fps: float, tp: int
) -> VideoMetadata:
    return VideoMetadata(
        fps=fps,
        duration=duration,
        total_frames=total,
        frame_indices=list(indices),
        timestamps=[i / fps for i in indices],
        sample_fps=sample_fps,
        second_per_grid_t=tp / sample_fps,
    )


def _preprocess(
    frames: list[Image.Image], opts: VideoSampling, cfg: VisionPreprocessConfig, sample_fps: float
) -> ProcessedVideo:
    if opts.resized_height is not None:
        # qwen-vl-utils snaps an explicit size with smart_resize's (image) default limits.
        min_pixels, max_pixels = float(cfg.min_pixels), float(cfg.max_pixels)
    else:
        min_pixels, max_pixels = frame_pixel_limits(opts, len(frames))
    return preprocess_video_frames(
        frames,
        cfg,
        fps=sample_fps,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        resized_height=opts.resized_height,
        resized_width=opts.resized_width,
    )


def load_video(
    source: VideoSource,
    opts: VideoSampling | None = None,
    cfg: VisionPreprocessConfig | None = None,
    policy: MediaPolicy = DEFAULT_POLICY,
    *,
    seek_gap: int = DEFAULT_SEEK_GAP,
) -> tuple[ProcessedVideo, VideoMetadata]:
    """Sample, decode and preprocess one video as qwen-vl-utils 0.0.14 would.

    Args:
        source: a local path or ``pathlib.Path``, a ``file://`` or ``http(s)://`` URL, a
            ``data:video/...;base64,...`` URI, encoded bytes, or a list of frames (each any
            image source ``load_image`` accepts). A frame list is used as is (padded to an even
            count by repeating the last frame) and assumed to run at ``opts.fps``.
        opts: sampling options (defaults: 2 fps, 4..768 frames, qwen-vl-utils pixel budget).
        cfg: the checkpoint's preprocessing config (patch, merge and temporal patch sizes).
        policy: byte/network/pixel limits; downloads use ``fetch_url`` under it.
        seek_gap: decode forward when the next sampled frame is at most this many frames
            ahead, otherwise seek to its preceding keyframe.

    Returns:
        The preprocessed clip and how it was sampled.

    Raises:
        MediaError: PyAV missing, unreadable or unreachable source, not a video, no frames,
            corrupt stream, a ``video_start``/``video_end`` range outside the video, ``nframes``
            larger than the video, bad options.
    """
    opts = VideoSampling() if opts is None else opts
    cfg = VisionPreprocessConfig() if cfg is None else cfg
    tp = cfg.temporal_patch_size
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError("a video frame list is empty")
        frames = [load_image(f, policy) for f in source]
        count = len(frames)
        frames += [frames[-1]] * (_ceil_by(count, FRAME_FACTOR) - count)
        meta = _metadata(list(range(count)), opts.fps, count, count / opts.fps, opts.fps, tp)
        return _preprocess(frames, opts, cfg, opts.fps), meta
    container, stream, info, what = _open(source, policy)
    try:
        indices = sample_indices(opts, info.total_frames, info.fps)
        start, end = frame_range(opts, info.total_frames, info.fps)
        sample_fps = len(indices) / (end - start + 1) * info.fps
        decoded = _decode_indices(container, stream, info, indices, what, seek_gap)
    finally:
        container.close()
    frames = [decoded[i] for i in indices]
    meta = _metadata(indices, info.fps, info.total_frames, info.duration, sample_fps, tp)
    return _preprocess(frames, opts, cfg, sample_fps), meta
