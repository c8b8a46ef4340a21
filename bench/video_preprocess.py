"""Video preprocessing cost: qwenvl's ``load_video`` against decoding every frame with PyAV.

Generates (once, cached) a long H.264 clip with a moving pattern, then measures in separate child
processes, so that each peak RSS (``ru_maxrss``) belongs to one measurement:

  * ``decode``: PyAV decodes every frame with threaded decoding (the floor for any sampler that
    cannot skip frames);
  * ``qwenvl``: ``load_video`` with the default ``VideoSampling`` and ``VisionPreprocessConfig``,
    producing ``pixel_values`` (``--pil``: also with ``frame_resize="pil"``);
  * ``qwenvl-budget`` (with ``--max-video-tokens N``): the same under a token budget.

Goals: qwenvl / decode <= 1.2 and peak RSS < 1.5 GiB (the output is kept as uint8 patches,
~0.5 GB for a 20-minute clip at the defaults: 768 frames at 336x644; float32 would be ~2 GB).

    python bench/video_preprocess.py                      # 20 min 1280x720 @ 30 fps
    python bench/video_preprocess.py --minutes 2 --video /tmp/clip2.mp4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(path: Path, minutes: float, width: int, height: int, fps: int) -> None:
    """An H.264 (libx264 ultrafast, else mpeg4) clip: a diagonal pattern scrolling sideways."""
    import av

    total = round(minutes * 60 * fps)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    tmp = path.with_suffix(".part" + path.suffix)
    # Planes twice as wide as the frame; each frame is a moving window onto them (cheap to make).
    yy, xx = np.mgrid[0:height, 0 : 2 * width]
    luma = ((xx + yy) % 64 * 3 + 16).astype(np.uint8)
    cu = ((xx[::2, ::2] // 8) % 200 + 28).astype(np.uint8)
    cv = ((yy[::2, ::2] // 8 + xx[::2, ::2] // 16) % 200 + 28).astype(np.uint8)
    start = time.perf_counter()
    with av.open(str(tmp), "w", format="mp4") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            s.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency"}
        s.thread_type = "AUTO"
        for i in range(total):
            off = (i * 4) % width
            plane = np.concatenate(
                [
                    luma[:, off : off + width],
                    cu[:, off // 2 : off // 2 + width // 2].reshape(-1, width),
                    cv[:, off // 2 : off // 2 + width // 2].reshape(-1, width),
                ]
            )
            # a frame counter block so frames differ beyond the scroll
            plane[8:40, 8 : 8 + (i % 64) * 4] = 235
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(plane), format="yuv420p")
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
            if i % (fps * 60) == 0:
                print(f"  generated {i / fps / 60:.0f} min ({time.perf_counter() - start:.0f} s)")
        for p in s.encode():
            c.mux(p)
    tmp.rename(path)


def child(kind: str, path: str, max_video_tokens: int | None) -> dict[str, object]:
    """One measurement, in this (fresh) process."""
    start = time.perf_counter()
    result: dict[str, object] = {"kind": kind}
    if kind == "decode":
        import av

        with av.open(path) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            n = sum(1 for _ in c.decode(stream))
        result.update(frames=n, tokens=None)
    else:
        from qwenvl.processing.image import VisionPreprocessConfig
        from qwenvl.processing.video import VideoSampling, load_video

        opts = VideoSampling(max_video_tokens=max_video_tokens)
        resize = "pil" if kind == "qwenvl-pil" else "swscale"
        video, meta = load_video(path, opts, VisionPreprocessConfig(), frame_resize=resize)
        result.update(
            frames=len(meta.frame_indices),
            tokens=video.num_tokens,
            size=f"{video.resized_height}x{video.resized_width}",
            output_mib=video.patches.numel() / 2**20,  # uint8 patches (normalised in the ViT)
            plan=meta.plan,
        )
    result["seconds"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads: robust to other load
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result


def run_child(kind: str, path: Path, max_video_tokens: int | None) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", kind, "--video", str(path)]
    if max_video_tokens is not None:
        cmd += ["--max-video-tokens", str(max_video_tokens)]
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--video", type=Path, help="cached clip (generated when missing)")
    ap.add_argument("--max-video-tokens", type=int, help="also measure load_video under a budget")
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement (best is kept)")
    ap.add_argument("--pil", action="store_true", help="also measure frame_resize='pil'")
    ap.add_argument("--child", choices=["decode", "qwenvl", "qwenvl-pil"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, str(args.video), args.max_video_tokens)))
        return
    path = args.video or Path(tempfile.gettempdir()) / (
        f"qwenvl_bench_{args.minutes:g}min_{args.width}x{args.height}_{args.fps}fps.mp4"
    )
    if not path.exists():
        print(f"generating {path} ...")
        generate(path, args.minutes, args.width, args.height, args.fps)
    print(f"video: {path} ({path.stat().st_size / 2**20:.0f} MiB)")

    def best(kind: str, budget: int | None = None) -> dict[str, object]:
        runs = [run_child(kind, path, budget) for _ in range(args.repeat)]
        return min(runs, key=lambda r: float(r["seconds"]))  # type: ignore[arg-type]

    rows = [("decode all frames", best("decode")), ("qwenvl load_video", best("qwenvl"))]
    if args.pil:
        rows.append(("qwenvl frame_resize=pil", best("qwenvl-pil")))
    if args.max_video_tokens:
        name = f"qwenvl <= {args.max_video_tokens} tok"
        rows.append((name, best("qwenvl", args.max_video_tokens)))
    base = float(rows[0][1]["seconds"])  # type: ignore[arg-type]
    base_cpu = float(rows[0][1]["cpu_seconds"])  # type: ignore[arg-type]
    print(
        f"{'measurement':<26} {'seconds':>8} {'ratio':>6} {'CPU s':>7} {'ratio':>6} "
        f"{'RSS MiB':>8} {'out MiB':>8} "
        f"{'frames':>7} {'tokens':>7}  size"
    )
    for name, r in rows:
        out_mib = r.get("output_mib")
        print(
            f"{name:<26} {float(r['seconds']):8.2f} {float(r['seconds']) / base:6.2f} "  # type: ignore[arg-type]
            f"{float(r['cpu_seconds']):7.1f} {float(r['cpu_seconds']) / base_cpu:6.2f} "  # type: ignore[arg-type]
            f"{float(r['rss_mib']):8.0f} {'' if out_mib is None else f'{out_mib:.0f}':>8} "  # type: ignore[arg-type]
            f"{r['frames']:>7} {'' if r['tokens'] is None else r['tokens']:>7}  {r.get('size', '')}"
        )
    for name, r in rows:
        if r.get("plan"):
            print(f"{name}: {r['plan']}")


if __name__ == "__main__":
    main()
