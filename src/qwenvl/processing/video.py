"""Video loading, sampled as qwen-vl-utils 0.0.14 does (the planning is in ``video_plan.py``, whose
names are re-exported here).

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
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from qwenvl.errors import MediaError, MediaTooLargeError
from qwenvl.processing.fetch import fetch_url
from qwenvl.processing.image import (
    ProcessedVideo,
    VisionPreprocessConfig,
    _loaded,
    to_rgb,
)
from qwenvl.processing.media import (
    URL_SCHEME,
    _file_url_to_path,
    check_local_path,
    image_size,
    load_image,
    parse_data_uri,
)
from qwenvl.processing.policy import DEFAULT_POLICY, MediaPolicy
from qwenvl.processing.policy import shorten as _short
from qwenvl.processing.video_frames import VideoFrameWriter
from qwenvl.processing.video_plan import (
    FPS,
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    FRAME_FACTOR,
    VIDEO_TOTAL_PIXELS,
    VideoInfo,
    VideoMetadata,
    VideoPlan,
    VideoSampling,
    _ceil_by,
    frame_pixel_limits,
    frame_range,
    plan_video,
    sample_indices,
    smart_nframes,
    video_tokens,
)

# the planning half lives in video_plan.py; its names are part of this module's API too
__all__ = [
    "FPS",
    "FPS_MAX_FRAMES",
    "FPS_MIN_FRAMES",
    "FRAME_FACTOR",
    "VIDEO_TOTAL_PIXELS",
    "VideoInfo",
    "VideoMetadata",
    "VideoPlan",
    "VideoSampling",
    "frame_pixel_limits",
    "frame_range",
    "plan_video",
    "sample_indices",
    "smart_nframes",
    "video_tokens",
    "DEFAULT_SEEK_GAP",
    "VideoSource",
    "load_video",
    "plan_from_header",
    "probe_video",
]

logger = logging.getLogger(__name__)

# Decode forward (instead of seeking) when the next sampled frame is at most this many frames on.
DEFAULT_SEEK_GAP = 64
# Decoded frames that may wait for the resize thread.
_IN_FLIGHT = 4
# Containers PyAV opens for still images; they are not videos.
_IMAGE_FORMATS = re.compile(r"^(image2|.*_pipe|apng|gif|webp)$")
VideoSource = str | bytes | bytearray | os.PathLike[str] | Sequence[Any]


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
            raise MediaTooLargeError(
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
        match = URL_SCHEME.match(text)
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
        policy.check_pixels(width, height, f"{what}: frames are")
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
    # frames come out of the decoder already at the plan's size: the file's size is the plan's
    writer = VideoFrameWriter(cfg, count, h, w, (plan.original_width, plan.original_height))

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


def _check_frame_size(plan: VideoPlan, policy: MediaPolicy, what: str) -> None:
    """Frames resized (``min_pixels``, ``resized_height``...) beyond the pixel limit are refused
    before any is decoded: the options are the request's, so they are bounded like a header."""
    policy.check_pixels(
        plan.resized_width,
        plan.resized_height,
        f"{what}: the options resize frames to",
        "; lower min_pixels or resized_height/width",
    )


def plan_from_header(
    source: VideoSource,
    opts: VideoSampling | None = None,
    cfg: VisionPreprocessConfig | None = None,
    policy: MediaPolicy = DEFAULT_POLICY,
    size_of: Callable[[Any], tuple[int, int]] | None = None,
) -> VideoPlan:
    """The plan :func:`load_video` will follow (frames, size, tokens), from headers alone: the
    container's, or each listed frame's. Lets training count a sample's tokens without decoding.
    ``size_of(frame)`` reads a listed frame's size (default ``image_size(frame, policy)``; the
    training index passes one that remembers the pictures it has read).

    Raises:
        MediaError: as :func:`load_video` would before decoding its first frame.
    """
    opts = VideoSampling() if opts is None else opts
    cfg = VisionPreprocessConfig() if cfg is None else cfg
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError("a video frame list is empty")
        size_of = size_of or (lambda frame: image_size(frame, policy))
        sizes = [size_of(f) for f in source]
        header = VideoInfo(
            fps=opts.fps,
            total_frames=len(sizes),
            duration=len(sizes) / opts.fps,
            width=sizes[0][0],
            height=sizes[0][1],
        )
        plan = plan_video(header, opts, cfg, frame_list=True)
        _check_frame_size(plan, policy, "video frames")
        return plan
    container, _, info, what = _open(source, policy)
    container.close()
    plan = plan_video(info, opts, cfg)
    _check_frame_size(plan, policy, what)
    return plan


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
        _check_frame_size(plan, policy, "video frames")
        frames = [frames[i] for i in plan.frame_indices]
        frames += [frames[-1]] * (_ceil_by(len(frames), FRAME_FACTOR) - len(frames))
        return _preprocess(frames, plan, cfg, len(frames)), _metadata(plan, header.duration)
    container, stream, info, what = _open(source, policy)
    try:
        plan = plan_video(info, opts, cfg)  # header only: a video that cannot fit fails here
        _check_frame_size(plan, policy, what)
        logger.info("%s: %s", what, plan.describe())
        wanted = list(plan.frame_indices)  # strictly increasing: linspace steps are >= 1 frame
        decoded = _decode_indices(container, stream, info, wanted, what, seek_gap)
        # Each frame is resized into the output as soon as it is decoded.
        frames = (frame for _, frame in decoded)
        video = _preprocess(frames, plan, cfg, len(wanted), frame_resize)
    finally:
        container.close()
    return video, _metadata(plan, info.duration)
