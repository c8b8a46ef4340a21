"""Image and video-frame preprocessing for the Qwen2-VL / Qwen2.5-VL vision tower (CPU, no I/O).

Pipeline (bit-identical to transformers' ``Qwen2VLImageProcessorPil``): convert to RGB, pick the
output size with ``smart_resize``, PIL bicubic resize on uint8, rescale by 1/255 (float64, then
float32), normalise with the CLIP mean/std in float32, duplicate the frame in time, and flatten into
``pixel_values[num_patches, C*TP*P*P]`` rows in merge-window order with ``grid_thw`` in patch units.
Loading images from files/URLs lives in ``media.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwenvl.errors import ConfigError, MediaError

# OpenAI CLIP normalisation constants used by every released Qwen2-VL / Qwen2.5-VL checkpoint.
IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# Per-frame pixel limits for video (qwen-vl-utils VIDEO_MIN_PIXELS / VIDEO_MAX_PIXELS).
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28

MAX_ASPECT_RATIO = 200

_RESCALE_FACTOR = 1 / 255


@dataclass(frozen=True)
class VisionPreprocessConfig:
    """Preprocessing hyperparameters, as stored in a checkpoint's ``preprocessor_config.json``.

    Defaults are the released Qwen2-VL / Qwen2.5-VL values (not the transformers 5.x class
    defaults, whose ``max_pixels`` is 1280*28*28).
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 16384 * 28 * 28
    image_mean: tuple[float, float, float] = IMAGE_MEAN
    image_std: tuple[float, float, float] = IMAGE_STD

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(
                    f"VisionPreprocessConfig.{name} must be a positive int, got {value!r}"
                )
        if self.min_pixels > self.max_pixels:
            raise ConfigError(
                f"VisionPreprocessConfig.min_pixels ({self.min_pixels}) must not exceed "
                f"max_pixels ({self.max_pixels})"
            )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 3
                or not all(_is_number(v) for v in value)
            ):
                raise ConfigError(
                    f"VisionPreprocessConfig.{name} must be three numbers, got {value!r}"
                )
            # Coerce lists (e.g. from JSON) so the config stays hashable.
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(
                f"VisionPreprocessConfig.image_std must be positive, got {self.image_std}"
            )

    @property
    def factor(self) -> int:
        """Side length in pixels of one merged token (``patch_size * merge_size``, 28)."""
        return self.patch_size * self.merge_size

    def to_hf(self, processor_class: str = "Qwen2VLProcessor") -> dict[str, Any]:
        """The ``preprocessor_config.json`` fields, in the released layout."""
        return {
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": processor_class,
        }

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], source: str = "preprocessor_config.json"
    ) -> VisionPreprocessConfig:
        """Build from a preprocessor config dict.

        Accepts the released hub layout (top-level ``min_pixels``/``max_pixels``), the transformers
        5.x layout (``size: {shortest_edge, longest_edge}``) and a 5.x ``processor_config.json``
        (image-processor dict nested under ``image_processor``). Top-level ``min_pixels`` /
        ``max_pixels`` win over ``size``, as in transformers. Unknown keys are ignored; settings we
        cannot honour (``do_normalize: false``, another ``resample`` ...) raise ``ConfigError``.

        Args:
            d: the parsed JSON object.
            source: file name used in error messages.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        nested = d.get("image_processor")
        if isinstance(nested, Mapping):
            d = nested
        _check_supported(d, source)

        kwargs: dict[str, Any] = {}
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            if d.get(name) is not None:
                kwargs[name] = _int_field(d, name, source)
        size = d.get("size")
        if size is not None:
            if not isinstance(size, Mapping):
                raise ConfigError(f"{source}: field 'size' must be an object, got {size!r}")
            aliases = {"shortest_edge": "min_pixels", "longest_edge": "max_pixels"}
            known = [
                k
                for k in ("shortest_edge", "min_pixels", "longest_edge", "max_pixels")
                if size.get(k) is not None
            ]
            if not known:
                raise ConfigError(
                    f"{source}: field 'size' must contain 'shortest_edge' and/or 'longest_edge' "
                    f"(pixel counts), got {dict(size)!r}"
                )
            for key in known:
                kwargs[aliases.get(key, key)] = _int_field(size, key, f"{source}: size")
        for name in ("min_pixels", "max_pixels"):
            if d.get(name) is not None:
                kwargs[name] = _int_field(d, name, source)
        for name in ("image_mean", "image_std"):
            if d.get(name) is not None:
                kwargs[name] = _triple_field(d, name, source)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _int_field(d: Mapping[str, Any], name: str, source: str) -> int:
    value = d[name]
    if not _is_int(value):
        raise ConfigError(f"{source}: field '{name}' must be an int, got {value!r}")
    return int(value)


def _triple_field(d: Mapping[str, Any], name: str, source: str) -> tuple[float, float, float]:
    value = d[name]
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(map(_is_number, value)):
        raise ConfigError(f"{source}: field '{name}' must be a list of 3 numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _check_supported(d: Mapping[str, Any], source: str) -> None:
    # These switches exist in the HF config; we implement only the released setting of each.
    for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        value = d.get(name)
        if value is not None and value is not True:
            raise ConfigError(f"{source}: field '{name}' = {value!r} is not supported (only true)")
    resample = d.get("resample")
    if resample is not None and (not _is_int(resample) or resample != Image.Resampling.BICUBIC):
        raise ConfigError(
            f"{source}: field 'resample' = {resample!r} is not supported (only 3, bicubic)"
        )
    factor = d.get("rescale_factor")
    if factor is not None and (not _is_number(factor) or abs(factor - _RESCALE_FACTOR) > 1e-12):
        raise ConfigError(
            f"{source}: field 'rescale_factor' = {factor!r} is not supported (only 1/255)"
        )


# ---------------------------------------------------------------------------------------------
# Sizes


def smart_resize(
    height: float,
    width: float,
    factor: int = 28,
    min_pixels: float = 4 * 28 * 28,
    max_pixels: float = 16384 * 28 * 28,
) -> tuple[int, int]:
    """Output ``(height, width)``: multiples of ``factor``, area in [min, max], aspect kept.

    Same arithmetic as the reference (Python ``round`` is half-to-even, so 70 px -> 56).

    Raises:
        MediaError: a side is not positive, or the aspect ratio exceeds 200.
    """
    if not (height > 0 and width > 0):
        raise MediaError(f"image size must be positive, got {width}x{height} (width x height)")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise MediaError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio} "
            f"(image {width}x{height})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _positive(name: str, value: object) -> float:
    """A positive finite number (ints stay ints so the arithmetic matches the reference's)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        number: float = int(value)
    elif isinstance(value, (float, np.floating)):
        number = float(value)
    else:
        raise MediaError(f"{name} must be a positive number, got {value!r}")
    if not math.isfinite(number) or number <= 0:
        raise MediaError(f"{name} must be a positive number, got {value!r}")
    return number


def resolve_image_size(
    width: int,
    height: int,
    cfg: VisionPreprocessConfig,
    *,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
    resized_height: float | None = None,
    resized_width: float | None = None,
) -> tuple[int, int]:
    """The ``(resized_height, resized_width)`` an image of ``width x height`` will be given.

    Needs only the header size, so callers can count tokens before decoding pixels.

    Args:
        width, height: original image size in pixels.
        cfg: the checkpoint's preprocessing config (default limits and factor).
        min_pixels, max_pixels: per-item overrides that replace ``cfg``'s limits.
        resized_height, resized_width: an explicit target size (both or neither); like
            qwen-vl-utils it is snapped to the grid by ``smart_resize``, here under the limits
            in force so an explicit size cannot exceed ``max_pixels``.

    Raises:
        MediaError: bad sizes or limits, or an aspect ratio over 200.
    """
    lo = cfg.min_pixels if min_pixels is None else _positive("min_pixels", min_pixels)
    hi = cfg.max_pixels if max_pixels is None else _positive("max_pixels", max_pixels)
    if lo > hi:
        raise MediaError(f"min_pixels ({lo}) must not exceed max_pixels ({hi})")
    if (resized_height is None) != (resized_width is None):
        raise MediaError("resized_height and resized_width must be given together")
    if resized_height is not None and resized_width is not None:
        target_h = _positive("resized_height", resized_height)
        target_w = _positive("resized_width", resized_width)
        return smart_resize(target_h, target_w, cfg.factor, lo, hi)
    return smart_resize(height, width, cfg.factor, lo, hi)


@dataclass(frozen=True)
class ImageGeometry:
    """Sizes of one image before and after resizing, and what it costs in the prompt."""

    original_width: int
    original_height: int
    resized_width: int
    resized_height: int
    grid_thw: tuple[int, int, int]  # in patch units: (1, resized_h / 14, resized_w / 14)
    num_tokens: int  # t*h*w // merge_size**2: the number of <|image_pad|> tokens


def image_geometry(
    width: int,
    height: int,
    cfg: VisionPreprocessConfig,
    *,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
    resized_height: float | None = None,
    resized_width: float | None = None,
) -> ImageGeometry:
    """``ImageGeometry`` of an image from its header size alone (see ``resolve_image_size``)."""
    rh, rw = resolve_image_size(
        width,
        height,
        cfg,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        resized_height=resized_height,
        resized_width=resized_width,
    )
    grid = (1, rh // cfg.patch_size, rw // cfg.patch_size)
    return ImageGeometry(
        original_width=width,
        original_height=height,
        resized_width=rw,
        resized_height=rh,
        grid_thw=grid,
        num_tokens=grid[0] * grid[1] * grid[2] // cfg.merge_size**2,
    )


# ---------------------------------------------------------------------------------------------
# Pixels


@dataclass
class ProcessedImage:
    """One image ready for the vision tower."""

    pixel_values: torch.Tensor  # [t*h*w, C*TP*P*P] float32
    grid_thw: tuple[int, int, int]
    geometry: ImageGeometry

    @property
    def num_tokens(self) -> int:
        return self.geometry.num_tokens


@dataclass
class ProcessedVideo:
    """One clip (a list of already sampled frames) ready for the vision tower.

    The frames are kept as uint8 ``patches`` in the final patch order, a quarter of the float32
    ``pixel_values``: normalisation is a per-channel table lookup (``lut``), done by
    :func:`normalize_patches` when a slice goes through the ViT, so a long video never exists as
    one float32 tensor. The result is bit-identical to normalising first.
    """

    patches: torch.Tensor  # [t*h*w, C*TP*P*P] uint8
    lut: torch.Tensor  # [C, 256] float32: the normalised value of every uint8 level per channel
    grid_thw: tuple[int, int, int]
    original_width: int  # of the first frame
    original_height: int
    resized_width: int
    resized_height: int
    num_frames: int  # frames given, before padding to a multiple of temporal_patch_size
    second_per_grid_t: float  # temporal_patch_size / fps; Qwen2.5-VL's time axis
    num_tokens: int  # number of <|video_pad|> tokens
    metadata: Any = None  # video.VideoMetadata when sampled from a file: indices, timestamps

    @property
    def pixel_values(self) -> torch.Tensor:
        """Normalised float32 ``[t*h*w, C*TP*P*P]``, as the reference processor returns it
        (allocated on each access: 4x the size of ``patches``)."""
        return normalize_patches(self.patches, self.lut)


def normalize_patches(patches: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """uint8 patch rows ``[N, C*K]`` -> float32 ``[N, C*K]`` through the per-channel table
    ``lut [C, 256]``."""
    c = lut.shape[0]
    out = np.empty(tuple(patches.shape), dtype=np.float32)
    rows = patches.numpy().reshape(patches.shape[0], c, -1)
    view = out.reshape(patches.shape[0], c, -1)
    table = lut.numpy()
    for ch in range(c):
        np.take(table[ch], rows[:, ch], out=view[:, ch], mode="clip")
    return torch.from_numpy(out)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB as transformers does.

    Images with an alpha band or a ``transparency`` entry are composited onto opaque white;
    everything else goes through ``Image.convert("RGB")``. Note that this means 16/32-bit integer
    and float modes (``I;16``, ``I``, ``F``) are clipped to 0..255, not rescaled.
    Returns the input object itself when it is already RGB without transparency.

    Raises:
        MediaError: PIL cannot convert (or lazily decode) the image.
    """
    if not isinstance(image, Image.Image):
        raise MediaError(f"expected a PIL image, got {type(image).__name__}")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        if image.mode == "RGB":
            return image
        return image.convert("RGB")
    except Exception as e:
        raise MediaError(
            f"cannot convert image of mode {image.mode!r} to RGB: {type(e).__name__}: {e}"
        ) from e


@functools.lru_cache(maxsize=8)
def _normalize_lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    # A uint8 pixel has 256 possible values, so the whole rescale+normalise chain is a table.
    # Same ops and dtypes as the reference: float64 rescale, cast to float32, float32 (x-m)/s.
    levels = (np.arange(256, dtype=np.float64) * _RESCALE_FACTOR).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32)[:, None]
    s = np.asarray(std, dtype=np.float32)[:, None]
    lut = (levels[None, :] - m) / s  # [C, 256] float32
    lut.flags.writeable = False
    return lut


def _normalize(rgb: np.ndarray, cfg: VisionPreprocessConfig) -> np.ndarray:
    """uint8 [H, W, C] -> normalised float32 [C, H, W]."""
    lut = _normalize_lut(cfg.image_mean, cfg.image_std)
    out = np.empty((rgb.shape[2], rgb.shape[0], rgb.shape[1]), dtype=np.float32)
    for c in range(rgb.shape[2]):
        np.take(lut[c], rgb[:, :, c], out=out[c])
    return out


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image  # PIL would return an identical copy
    return image.resize((width, height), Image.Resampling.BICUBIC)


def patchify(
    frames: np.ndarray, cfg: VisionPreprocessConfig
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Flatten normalised frames into vision-tower rows.

    Args:
        frames: float32 ``[T, C, H, W]``; H and W multiples of ``cfg.factor``. T is padded up to a
            multiple of ``temporal_patch_size`` by repeating the last frame.

    Returns:
        ``pixel_values [gt*gh*gw, C*TP*P*P]`` float32 and ``grid_thw = (gt, gh, gw)`` in patch
        units. Rows run over (t, block row, block col, row in block, col in block), so the 4
        patches of one 2x2 merge window are consecutive; columns are (C, TP, ph, pw), the flatten
        order of the Conv3d kernel.
    """
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise ValueError(f"frames must be [T>0, C, H, W], got shape {frames.shape}")
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    t, c, h, w = frames.shape
    if h % cfg.factor or w % cfg.factor:
        raise ValueError(f"frame size {h}x{w} is not a multiple of {cfg.factor}")
    if t % tp:
        pad = np.repeat(frames[-1:], tp - t % tp, axis=0)
        frames = np.concatenate([frames, pad], axis=0)
    gt, gh, gw = frames.shape[0] // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, bh, bw, mh, mw, C, TP, ph, pw]
    rows = np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p)
    return torch.from_numpy(rows), (gt, gh, gw)


def _loaded(image: object, what: str) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise MediaError(f"{what} must be a PIL image, got {type(image).__name__}")
    try:
        image.load()  # surface lazy-decoding errors (truncated files) as MediaError
    except Exception as e:
        raise MediaError(f"{what} cannot be decoded: {type(e).__name__}: {e}") from e
    return image


def preprocess_image(
    image: Image.Image,
    cfg: VisionPreprocessConfig,
    *,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
    resized_height: float | None = None,
    resized_width: float | None = None,
) -> ProcessedImage:
    """Turn one PIL image into ``pixel_values`` and ``grid_thw`` for the vision tower.

    Bit-identical to ``transformers.Qwen2VLImageProcessorPil`` with the same limits. Keyword
    arguments are per-item overrides, see ``resolve_image_size``.

    Raises:
        MediaError: not a PIL image, undecodable, unconvertible mode, or a bad size.
    """
    rgb = to_rgb(_loaded(image, "image"))
    geometry = image_geometry(
        rgb.width,
        rgb.height,
        cfg,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        resized_height=resized_height,
        resized_width=resized_width,
    )
    resized = _resize(rgb, geometry.resized_width, geometry.resized_height)
    chw = _normalize(np.asarray(resized), cfg)
    pixel_values, grid = patchify(chw[None], cfg)  # the single frame is repeated in time
    return ProcessedImage(pixel_values=pixel_values, grid_thw=grid, geometry=geometry)
