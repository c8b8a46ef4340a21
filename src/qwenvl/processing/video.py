"""Video loading and frame sampling, matching qwen-vl-utils 0.0.14.

Planning (pure, no decoding): ``smart_nframes`` picks how many frames to sample, ``sample_indices``
where (``linspace(start, end, n).round()`` over the ``video_start``/``video_end`` range), and
``frame_pixel_limits`` the per-frame pixel limits under the ``total_pixels`` budget; ``plan_video``
combines them and, under a ``max_video_tokens`` budget, shrinks the frames and then drops frames,
from the container header alone.

Decoding uses PyAV (``pip install qwenvl[video]``) with threaded decoding and converts only the
sampled frames: it decodes forward when the next sampled frame is near and seeks to the preceding
keyframe when it is far. Each sampled frame goes straight into the output (``VideoFrameWriter``,
on a worker thread that overlaps decoding), so memory holds the output and a few frames, not the
sampled clip. Frames are resized with FFmpeg's bicubic (``frame_resize="swscale"``, the default:
within a few levels of PIL, about twice as fast) or PIL bicubic exactly as images
(``frame_resize="pil"``); normalisation is the image path's. qwen-vl-utils resizes video frames with
torchvision bicubic + antialias instead, so pixel values differ slightly from the reference; the
sizes, frame indices and token counts are identical.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    VideoFrameWriter,
    VisionPreprocessConfig,
    _loaded,
    smart_resize,
    to_rgb,
)
from qwenvl.processing.media import (
    DEFAULT_POLICY,
    MediaPolicy,
    _file_url_to_path,
    _short,
    check_local_path,
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
# Decoded frames that may wait for the resize thread.
_IN_FLIGHT = 4
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
    ``max_video_tokens`` caps the video's ``<|video_pad|>`` tokens: ``plan_video`` then shrinks
    the frames, then drops frames, to fit.
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
    # Token budget for this video (None = unlimited); see ``plan_video``.
    max_video_tokens: int | None = None

    def __post_init__(self) -> None:
        positive = ("fps", "min_pixels", "total_pixels")
        for name in positive + ("max_pixels", "resized_height", "resized_width"):
            value = getattr(self, name)
            if value is None and name not in positive:
                continue
            if not _is_num(value) or value <= 0:
                raise MediaError(f"video option {name!r} must be a positive number, got {value!r}")
        for name in ("nframes", "min_frames", "max_frames", "max_video_tokens"):
            value = getattr(self, name)
            if value is None and name in ("nframes", "max_video_tokens"):
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
    num_tokens: int | None = None  # <|video_pad|> tokens the plan gives
    max_video_tokens: int | None = None  # the budget in force (None = unlimited)
    plan: str | None = None  # VideoPlan.describe(): what was chosen and why


# ---------------------------------------------------------------------------------------------
# Token-budget planning (header facts only: runs before any frame is decoded)


@dataclass(frozen=True)
class VideoPlan:
    """Which frames to sample and at what size, so the video fits its token budget.

    ``frame_indices`` are source frame indices (``linspace`` over the selected range, rounded);
    ``second_per_grid_t`` is the time one temporal patch group spans, Qwen2.5-VL's time axis.
    """

    frame_indices: tuple[int, ...]
    fps: float  # source frame rate (a frame list: the rate it is assumed to have)
    total_frames: int  # of the source
    original_width: int
    original_height: int
    resized_width: int
    resized_height: int
    num_tokens: int
    sample_fps: float
    second_per_grid_t: float
    max_tokens: int | None  # the budget (None = unlimited)
    default_nframes: int  # what the qwen-vl-utils rules alone give
    default_height: int
    default_width: int
    default_tokens: int

    @property
    def nframes(self) -> int:
        return len(self.frame_indices)

    @property
    def reduced(self) -> bool:
        """True when the budget changed the qwen-vl-utils choice."""
        return self.num_tokens != self.default_tokens or self.nframes != self.default_nframes

    def describe(self) -> str:
        first = self.frame_indices[0] / self.fps
        last = self.frame_indices[-1] / self.fps
        text = (
            f"{self.nframes} of {self.total_frames} frames ({first:.2f}-{last:.2f} s, one every "
            f"{1 / self.sample_fps:.3g} s) at {self.resized_height}x{self.resized_width} "
            f"(from {self.original_height}x{self.original_width}): {self.num_tokens} tokens"
        )
        if self.max_tokens is not None:
            text += f", budget {self.max_tokens}"
        if self.reduced:
            text += (
                f"; without the budget: {self.default_nframes} frames at "
                f"{self.default_height}x{self.default_width}, {self.default_tokens} tokens"
            )
        return text


def video_tokens(nframes: int, height: int, width: int, cfg: VisionPreprocessConfig) -> int:
    """``<|video_pad|>`` tokens of ``nframes`` frames resized to ``height x width``."""
    groups = -(-nframes // cfg.temporal_patch_size)
    return groups * (height // cfg.patch_size) * (width // cfg.patch_size) // cfg.merge_size**2


def _budget(*limits: int | None) -> int | None:
    given = [x for x in limits if x is not None]
    if any(not _is_int(x) or x <= 0 for x in given):
        raise MediaError(f"max_video_tokens must be a positive int, got {given}")
    return min(given) if given else None


def plan_video(
    info: VideoInfo,
    opts: VideoSampling,
    cfg: VisionPreprocessConfig,
    max_tokens: int | None = None,
    *,
    frame_list: bool = False,
) -> VideoPlan:
    """Frames and frame size for a video, from its header alone, under a token budget.

    First the qwen-vl-utils 0.0.14 rules, unchanged (``sample_indices``, ``frame_pixel_limits``,
    ``smart_resize``). Only when that exceeds the budget (the smaller of
    ``opts.max_video_tokens`` and ``max_tokens``):

    1. the per-frame ``max_pixels`` is lowered (``smart_resize`` keeps sizes multiples of 28)
       down to ``int(min_pixels * 1.05)``, the floor qwen-vl-utils itself clamps to;
    2. then the frame count is lowered (even, >= 2; ``min_frames``/``nframes`` give way) to the
       most frames that fit at that floor, and the size is re-fitted to the budget. Indices stay
       ``linspace`` over the selected range, and ``second_per_grid_t`` is then the real spacing
       of those frames (qwen-vl-utils' ``n / total`` rate is off by up to ``n / (n - 1)``).

    With ``resized_height``/``resized_width`` the size is fixed and only frames are dropped.
    ``frame_list=True`` plans a list of ``info.total_frames`` frames at ``opts.fps``: all of them
    (padded to even) unless the budget drops some.

    Raises:
        MediaError: 2 frames at the smallest size do not fit (the message gives the tokens they
            need, the budget and the difference), or the qwen-vl-utils rules fail (see
            ``sample_indices``).
    """
    budget = _budget(opts.max_video_tokens, max_tokens)
    tp, factor = cfg.temporal_patch_size, cfg.factor
    fps, total = info.fps, info.total_frames
    if frame_list:
        start, end = 0, total - 1
        n0 = _ceil_by(total, FRAME_FACTOR)
        indices0 = list(range(total))
    else:
        start, end = frame_range(opts, total, fps)
        n0 = smart_nframes(opts, end - start + 1, fps)
        indices0 = torch.linspace(start, end, n0).round().long().tolist()
    explicit = opts.resized_height is not None and opts.resized_width is not None

    def limits(n: int) -> tuple[float, float]:
        if explicit:  # qwen-vl-utils snaps an explicit size with smart_resize's default limits
            return float(cfg.min_pixels), float(cfg.max_pixels)
        return frame_pixel_limits(opts, n)

    def size(n: int, cap: float | None = None) -> tuple[int, int]:
        lo, hi = limits(n)
        h, w = (opts.resized_height, opts.resized_width) if explicit else (info.height, info.width)
        return smart_resize(h, w, factor, lo, hi if cap is None else min(hi, cap))  # type: ignore[arg-type]

    h0, w0 = size(n0)
    tokens0 = video_tokens(n0, h0, w0, cfg)

    def make(indices: list[int], h: int, w: int, exact_rate: bool) -> VideoPlan:
        n = len(indices) if not frame_list or exact_rate else n0
        if exact_rate:  # the real spacing of the linspace indices
            spg = tp * (end - start) / ((len(indices) - 1) * fps)
            sample_fps = tp / spg
        else:  # qwen-vl-utils: n / frames-in-range * fps (a frame list: opts.fps)
            sample_fps = opts.fps if frame_list else len(indices) / (end - start + 1) * fps
            spg = tp / sample_fps
        return VideoPlan(
            frame_indices=tuple(indices),
            fps=fps,
            total_frames=total,
            original_width=info.width,
            original_height=info.height,
            resized_width=w,
            resized_height=h,
            num_tokens=video_tokens(n, h, w, cfg),
            sample_fps=sample_fps,
            second_per_grid_t=spg,
            max_tokens=budget,
            default_nframes=len(indices0),
            default_height=h0,
            default_width=w0,
            default_tokens=tokens0,
        )

    if budget is None or tokens0 <= budget:
        return make(indices0, h0, w0, exact_rate=False)

    def fit(n: int) -> tuple[int, int] | None:
        """The largest qwen-vl-utils size for ``n`` frames under the budget, or None."""
        if explicit:
            return (h0, w0) if video_tokens(n, h0, w0, cfg) <= budget else None
        lo, _ = limits(n)
        per_group = budget // -(-n // tp)
        cap = max(per_group * factor**2, int(lo * 1.05))
        h, w = size(n, cap)
        return (h, w) if video_tokens(n, h, w, cfg) <= budget else None

    fitted = fit(n0)
    if fitted is not None:
        return make(indices0, *fitted, exact_rate=False)
    # The smallest frame: qwen-vl-utils' own floor for max_pixels, int(min_pixels * 1.05).
    hmin, wmin = (h0, w0) if explicit else size(n0, int(limits(n0)[0] * 1.05))
    per_group_min = video_tokens(tp, hmin, wmin, cfg)
    n = _floor_by(budget // per_group_min * tp, FRAME_FACTOR)
    fitted = fit(n) if n >= FRAME_FACTOR else None
    if fitted is None:
        need = video_tokens(FRAME_FACTOR, hmin, wmin, cfg)
        raise MediaError(
            f"the video does not fit in {budget} tokens: even {FRAME_FACTOR} frames at the "
            f"smallest size {hmin}x{wmin} (min_pixels={limits(n0)[0]:g}) need {need} tokens, "
            f"{need - budget} more than the budget (without a budget: {len(indices0)} frames "
            f"at {h0}x{w0}, {tokens0} tokens)"
        )
    indices = torch.linspace(start, end, n).round().long().tolist()
    return make(indices, *fitted, exact_rate=True)


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
    path = check_local_path(path, policy)  # local files allowed, and under the allowed folder
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


class _Keyframes:
    """Keyframe spacing seen while decoding: a lower bound on the distance a seek can skip."""

    def __init__(self) -> None:
        self.last: int | None = None  # index of the last keyframe decoded
        self.interval = 0  # longest distance between two keyframes decoded

    def see(self, frame: Any, index: int) -> None:
        if frame.key_frame:
            if self.last is not None and index > self.last:
                self.interval = max(self.interval, index - self.last)
            self.last = index

    def gop_at_least(self, pos: int) -> int:
        """Frames a keyframe interval spans at least (0 when unknown)."""
        return max(self.interval, pos - self.last if self.last is not None else 0)


def _next_at_or_after(
    frames: Any,
    stream: Any,
    fps: float,
    target: int,
    pos: int | None,
    keys: _Keyframes | None = None,
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
        if keys is not None:
            keys.see(frame, index)
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
) -> Iterator[tuple[int, Any]]:
    """Decode only the frames at ``wanted`` indices: yields ``(index, av.VideoFrame)`` in index
    order (each index once); no frame is converted here."""
    count = 0
    stream.thread_type = "AUTO"
    start_pts = stream.start_time or 0
    frames: Any = None
    pos: int | None = 0  # index of the next frame the decoder returns (None: unknown)
    last: tuple[int, Any] | None = None
    keys = _Keyframes()
    try:
        for target in sorted(set(wanted)):
            if last is not None and last[0] >= target:
                count += 1  # e.g. a gap in the pts: reuse the nearest later frame
                yield target, last[1]
                continue
            seeked = False
            if frames is None and target <= seek_gap:
                frames = container.decode(stream)
                pos = 0
            elif (
                frames is None
                or pos is None
                or target - pos > (seek_gap and max(seek_gap, keys.gop_at_least(pos)))
            ):
                # Seek to the keyframe at or before the target, then decode forward.
                offset = start_pts + int(target / info.fps / stream.time_base)
                logger.debug("%s: seeking to frame %d", what, target)
                container.seek(offset, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
                pos, seeked = None, True
                keys.last = None  # only keyframes decoded one after the other give a spacing
            found = _next_at_or_after(frames, stream, info.fps, target, pos, keys)
            if seeked and (found is None or (found[2] == 1 and found[0] > target)):
                # The seek landed after the target: decode from the start instead.
                logger.debug(
                    "%s: seek for frame %d overshot; decoding from the start", what, target
                )
                container.seek(start_pts, stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
                keys.last = None
                found = _next_at_or_after(frames, stream, info.fps, target, 0, keys)
            if found is None:
                tolerance = max(2, info.total_frames // 50)
                if last is not None and target >= info.total_frames - tolerance:
                    # Header frame counts can overshoot by a frame or two: reuse the last frame.
                    count += 1
                    yield target, last[1]
                    continue
                raise MediaError(
                    f"{what} is truncated or corrupt: the stream ended before frame {target} of "
                    f"{info.total_frames}"
                )
            index, frame, _ = found
            last = (index, frame)  # converted later, on the resize thread
            pos = index + 1
            count += 1
            yield target, last[1]
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(
            f"{what}: cannot decode the video stream, it is corrupt or truncated "
            f"({type(e).__name__}: {e})"
        ) from e
    if not count:
        raise MediaError(f"{what}: no frame could be decoded")


def _metadata(plan: VideoPlan, duration: float) -> VideoMetadata:
    return VideoMetadata(
        fps=plan.fps,
        duration=duration,
        total_frames=plan.total_frames,
        frame_indices=list(plan.frame_indices),
        timestamps=[i / plan.fps for i in plan.frame_indices],
        sample_fps=plan.sample_fps,
        second_per_grid_t=plan.second_per_grid_t,
        num_tokens=plan.num_tokens,
        max_video_tokens=plan.max_tokens,
        plan=plan.describe(),
    )


def _frame_image(frame: Any, width: int, height: int, frame_resize: str) -> Image.Image:
    """A decoded frame (or an image) as an RGB image; with ``"swscale"`` already resized."""
    if isinstance(frame, Image.Image):
        return frame
    try:
        rgb = frame.reformat(format="rgb24")  # the same pixels as frame.to_image(), faster
        if frame_resize == "swscale" and (rgb.width, rgb.height) != (width, height):
            rgb = rgb.reformat(width=width, height=height, interpolation="BICUBIC")
        return Image.fromarray(rgb.to_ndarray())
    except Exception as e:
        raise MediaError(f"cannot convert a video frame: {type(e).__name__}: {e}") from e


def _preprocess(
    frames: Iterable[Any],
    plan: VideoPlan,
    cfg: VisionPreprocessConfig,
    count: int,
    frame_resize: str = "pil",
) -> ProcessedVideo:
    """Convert, resize and normalise ``count`` frames into the plan's size as they arrive.

    The work runs on a worker thread (swscale, PIL and numpy release the GIL) while this thread
    decodes the next frames; at most ``_IN_FLIGHT`` frames wait for it.
    """
    w, h = plan.resized_width, plan.resized_height
    writer = VideoFrameWriter(cfg, count, h, w)

    def add(i: int, frame: Any) -> None:
        image = _frame_image(frame, w, h, frame_resize)
        writer.add(to_rgb(_loaded(image, f"video frame {i}")))

    with ThreadPoolExecutor(1, thread_name_prefix="qwenvl-video") as pool:
        pending: deque[Future[None]] = deque()
        for i, frame in enumerate(frames):
            pending.append(pool.submit(add, i, frame))
            if len(pending) > _IN_FLIGHT:
                pending.popleft().result()
        for job in pending:
            job.result()
    return writer.finish(plan.second_per_grid_t)


def load_video(
    source: VideoSource,
    opts: VideoSampling | None = None,
    cfg: VisionPreprocessConfig | None = None,
    policy: MediaPolicy = DEFAULT_POLICY,
    *,
    seek_gap: int = DEFAULT_SEEK_GAP,
    frame_resize: str = "swscale",
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
            ahead, or at most one keyframe interval (as seen so far: a seek could not skip
            anything), otherwise seek to its preceding keyframe. 0 seeks for every frame.
        frame_resize: how decoded frames are resized: ``"swscale"`` (FFmpeg bicubic after an
            exact RGB conversion; ~2x faster, within a few levels of PIL: mean |diff| < 1 of
            255) or ``"pil"`` (PIL bicubic, bit-identical to preprocessing the frames as
            images). Frame lists always use PIL.

    ``opts.max_video_tokens`` bounds the tokens (``plan_video``; a frame list follows the same
    budget); the plan is made from the header before any frame is decoded and is reported in
    ``VideoMetadata.plan``.

    Returns:
        The preprocessed clip and how it was sampled.

    Raises:
        MediaError: PyAV missing, unreadable or unreachable source, not a video, no frames,
            corrupt stream, a ``video_start``/``video_end`` range outside the video, ``nframes``
            larger than the video, bad options, a video that cannot fit ``max_video_tokens``.
    """
    opts = VideoSampling() if opts is None else opts
    cfg = VisionPreprocessConfig() if cfg is None else cfg
    if frame_resize not in ("swscale", "pil"):
        raise MediaError(f"frame_resize must be 'swscale' or 'pil', got {frame_resize!r}")
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError("a video frame list is empty")
        frames = [load_image(f, policy) for f in source]
        count = len(frames)
        header = VideoInfo(
            fps=opts.fps,
            total_frames=count,
            duration=count / opts.fps,
            width=frames[0].width,
            height=frames[0].height,
        )
        plan = plan_video(header, opts, cfg, frame_list=True)
        frames = [frames[i] for i in plan.frame_indices]
        frames += [frames[-1]] * (_ceil_by(len(frames), FRAME_FACTOR) - len(frames))
        return _preprocess(frames, plan, cfg, len(frames)), _metadata(plan, header.duration)
    container, stream, info, what = _open(source, policy)
    try:
        plan = plan_video(info, opts, cfg)  # header only: a video that cannot fit fails here
        logger.info("%s: %s", what, plan.describe())
        wanted = list(plan.frame_indices)  # strictly increasing: linspace steps are >= 1 frame
        decoded = _decode_indices(container, stream, info, wanted, what, seek_gap)
        # Each frame is resized into the output as soon as it is decoded.
        frames = (frame for _, frame in decoded)
        video = _preprocess(frames, plan, cfg, len(wanted), frame_resize)
    finally:
        container.close()
    return video, _metadata(plan, info.duration)
