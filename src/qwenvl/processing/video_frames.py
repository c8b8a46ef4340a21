"""Video frames to the vision tower's input: resized frames written group by group into uint8
patch rows (``VideoFrameWriter``), and the whole path for a list of already sampled frames
(``preprocess_video_frames``). Sizes and normalisation are the image path's (``image.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from qwenvl.errors import MediaError
from qwenvl.processing.image import (
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    ProcessedVideo,
    VisionPreprocessConfig,
    _is_number,
    _loaded,
    _normalize_lut,
    _resize,
    resolve_image_size,
    to_rgb,
)


def preprocess_video_frames(
    frames: list[Image.Image],
    cfg: VisionPreprocessConfig,
    *,
    fps: float = 2.0,
    min_pixels: float = VIDEO_MIN_PIXELS,
    max_pixels: float = VIDEO_MAX_PIXELS,
    resized_height: float | None = None,
    resized_width: float | None = None,
) -> ProcessedVideo:
    """Turn already sampled frames into one video item.

    Every frame is resized (PIL bicubic) to the size ``smart_resize`` picks for the first frame
    under the per-frame video limits, normalised like an image, and an odd frame count is padded
    by repeating the last frame.

    Args:
        frames: the sampled frames, in order.
        fps: the rate the frames were sampled at; gives ``second_per_grid_t = TP / fps``.
        min_pixels, max_pixels: per-frame pixel limits (defaults: qwen-vl-utils video limits).
        resized_height, resized_width: explicit frame size (both or neither).

    Raises:
        MediaError: no frames, a non-image frame, a bad fps or size.
    """
    if not isinstance(frames, (list, tuple)) or len(frames) == 0:
        raise MediaError("a video needs a non-empty list of frames")
    if not _is_number(fps) or not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"fps must be a positive number, got {fps!r}")
    first = to_rgb(_loaded(frames[0], "video frame 0"))
    rh, rw = resolve_image_size(
        first.width,
        first.height,
        cfg,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        resized_height=resized_height,
        resized_width=resized_width,
    )
    writer = VideoFrameWriter(cfg, len(frames), rh, rw)
    writer.add(first)
    for i in range(1, len(frames)):
        writer.add(to_rgb(_loaded(frames[i], f"video frame {i}")))
    return writer.finish(cfg.temporal_patch_size / float(fps))


def _patchify_group_into(group: np.ndarray, cfg: VisionPreprocessConfig, out: np.ndarray) -> None:
    """The uint8 pixels of ``group`` reordered into patch rows, written into ``out``; with
    :func:`normalize_patches` this is ``patchify(_normalize(frame) for frame in group)``.

    ``group`` is uint8 ``[TP, H, W, C]``; ``out`` uint8 ``[H/P * W/P, C*TP*P*P]``.
    """
    p, m = cfg.patch_size, cfg.merge_size
    tp, h, w, c = group.shape
    x = group.reshape(tp, h // (m * p), m, p, w // (m * p), m, p, c)
    x = x.transpose(1, 4, 2, 5, 7, 0, 3, 6)  # [bh, bw, mh, mw, C, TP, ph, pw]
    out.reshape(x.shape[0], x.shape[1], m, m, c, tp, p, p)[...] = x


class VideoFrameWriter:
    """Builds a video's uint8 ``patches`` frame by frame, as frames arrive (e.g. from a decoder).

    Each RGB frame is resized (PIL bicubic) when added, and a temporal group is reordered into
    patch rows as soon as it is complete, so only the output and one group are held.
    """

    def __init__(
        self,
        cfg: VisionPreprocessConfig,
        num_frames: int,
        resized_height: int,
        resized_width: int,
        original_size: tuple[int, int] | None = None,
    ) -> None:
        """``original_size`` (width, height): the video's own size, when the frames arrive
        already resized (the decoder scales them); otherwise the first frame's."""
        if num_frames <= 0:
            raise MediaError("a video needs at least one frame")
        self.cfg, self.num_frames = cfg, num_frames
        self.rh, self.rw = resized_height, resized_width
        p, tp = cfg.patch_size, cfg.temporal_patch_size
        self.grid = (-(-num_frames // tp), resized_height // p, resized_width // p)
        self.rows_per_group = self.grid[1] * self.grid[2]
        # zeros, not empty: one bulk first touch of the pages is several times cheaper than
        # faulting them in group by group (measured in bench/video_preprocess.py)
        self.patches = torch.zeros(
            self.grid[0] * self.rows_per_group, 3 * tp * p * p, dtype=torch.uint8
        )
        self.original_size = original_size  # (width, height)
        self._group: list[np.ndarray] = []
        self._added = 0

    def add(self, frame: Image.Image) -> None:
        """Append the next frame (RGB PIL image)."""
        if self._added >= self.num_frames:
            raise MediaError(f"more than the {self.num_frames} frames announced")
        if self.original_size is None:
            self.original_size = frame.size
        self._group.append(np.asarray(_resize(frame, self.rw, self.rh)))  # uint8 [H, W, C]
        self._added += 1
        tp = self.cfg.temporal_patch_size
        if len(self._group) == tp or self._added == self.num_frames:
            g = (self._added - 1) // tp
            self._group += [self._group[-1]] * (tp - len(self._group))  # pad the last group
            out = self.patches[g * self.rows_per_group : (g + 1) * self.rows_per_group]
            _patchify_group_into(np.stack(self._group), self.cfg, out.numpy())
            self._group = []

    def finish(self, second_per_grid_t: float) -> ProcessedVideo:
        """The finished clip; every announced frame must have been added."""
        if self._added != self.num_frames or self.original_size is None:
            raise MediaError(f"got {self._added} of {self.num_frames} video frames")
        t, h, w = self.grid
        return ProcessedVideo(
            patches=self.patches,
            lut=torch.from_numpy(_normalize_lut(self.cfg.image_mean, self.cfg.image_std).copy()),
            grid_thw=self.grid,
            original_width=self.original_size[0],
            original_height=self.original_size[1],
            resized_width=self.rw,
            resized_height=self.rh,
            num_frames=self.num_frames,
            second_per_grid_t=second_per_grid_t,
            num_tokens=t * h * w // self.cfg.merge_size**2,
        )
