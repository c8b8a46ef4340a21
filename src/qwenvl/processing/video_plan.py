"""Video frame sampling and token-budget planning, matching qwen-vl-utils 0.0.14 (pure: no I/O).

``smart_nframes`` picks how many frames to sample, ``sample_indices`` where (``linspace(start, end,
n).round()`` over the ``video_start``/``video_end`` range), and ``frame_pixel_limits`` the per-frame
pixel limits under the ``total_pixels`` budget; ``plan_video`` combines them and, under a
``max_video_tokens`` budget, shrinks the frames and then drops frames, from the container header
alone. Decoding lives in ``video.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from qwenvl.errors import MediaError
from qwenvl.processing.image import (
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VisionPreprocessConfig,
    smart_resize,
)

FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
# qwen-vl-utils 0.0.14: MODEL_SEQ_LEN (128000) * 28 * 28 * 0.9, a float.
VIDEO_TOTAL_PIXELS = 128000 * 28 * 28 * 0.9


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
