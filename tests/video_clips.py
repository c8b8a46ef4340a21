"""Small generated videos whose frames show their own index (8 black/white bars = 8 bits), so a
test can read back which source frame it got."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

W, H = 64, 48


def frame_array(i: int) -> np.ndarray:
    """Frame ``i`` shows the 8 bits of ``i`` as 8 black/white vertical bars."""
    a = np.zeros((H, W, 3), np.uint8)
    for b in range(8):
        if (i >> b) & 1:
            a[:, b * W // 8 : (b + 1) * W // 8] = 255
    return a


def index_of(image: Image.Image) -> int:
    """The frame index a (possibly resized, lossy) frame shows."""
    a = np.asarray(image.convert("L").resize((W, H)), dtype=np.float64)
    bars = [a[:, b * W // 8 + 2 : (b + 1) * W // 8 - 2].mean() for b in range(8)]
    return sum(1 << b for b, v in enumerate(bars) if v > 127)


def make_video(path: Path, n: int, fps: int, gop: int = 12) -> Path:
    """``n`` frames at ``fps`` with a keyframe every ``gop`` frames (H.264, else MPEG-4)."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.gop_size = gop
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(frame_array(i), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path
