"""The chat page of ``qwenvl serve`` in a real browser: its weight, its first paint on loopback,
and (``--screenshots DIR``) a screenshot of each state for the README.

    python bench/web_page.py                          # weight + first paint, 10 cold loads
    python bench/web_page.py --screenshots docs/web   # and the README's screenshots

Serves the bundled demo model (``qwenvl serve`` without ``--model``) on a free loopback port and
drives Debian's Chromium (``/usr/bin/chromium``) through Playwright. Each load is a fresh browser
context (empty cache); first paint is the browser's own ``first-contentful-paint`` entry.
"""

from __future__ import annotations

import argparse
import io
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from qwenvl.demo import example_image_path
from qwenvl.demo.tasks import VIDEO_FPS, VIDEO_SIDE, make_sample

CHROMIUM = "/usr/bin/chromium"
WEB_DIR = Path(__file__).parents[1] / "src" / "qwenvl" / "server" / "web"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwenvl", "serve", "--port", str(port)]
    cmd += ["--max-image-pixels", "250000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"qwenvl serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("qwenvl serve did not come up")


def measure_loads(browser: Any, base: str, loads: int) -> dict[str, Any]:
    paints, ready, transferred = [], [], []
    for _ in range(loads):
        context = browser.new_context()
        page = context.new_page()
        sizes: dict[str, int] = {}

        def count(r: Any, sizes: dict[str, int] = sizes) -> None:
            sizes[r.url] = int(r.headers.get("content-length", 0))

        page.on("response", count)
        page.goto(base + "/")
        page.wait_for_selector("#model option[value='qwenvl-demo']", state="attached")
        timing = page.evaluate(
            "[performance.getEntriesByType('paint').find(e => e.name === "
            "'first-contentful-paint')?.startTime, "
            "performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd]"
        )
        paints.append(timing[0])
        ready.append(timing[1])
        transferred.append(sum(n for u, n in sizes.items() if "/v1/" not in u))
        context.close()
    return {"fcp_ms": paints, "dcl_ms": ready, "bytes": transferred}


def demo_clip(path: Path) -> tuple[Path, str]:
    """A clip of the demo's "when" task (blocks appear one by one) and its question."""
    import av

    sample = make_sample("when", random.Random(7))
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=2)
        s.width, s.height, s.pix_fmt = sample.video[0].width, sample.video[0].height, "yuv420p"
        for frame in sample.video:
            for p in s.encode(av.VideoFrame.from_image(frame.convert("RGB"))):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path, sample.question


def save(page: Any, out: Path, name: str) -> None:
    """A viewport screenshot, reduced to a 64-colour palette: small enough to commit."""
    shot = Image.open(io.BytesIO(page.screenshot()))
    shot.convert("RGB").quantize(64, dither=Image.Dither.NONE).save(out / name, optimize=True)
    print(f"  {out / name}: {(out / name).stat().st_size // 1024} KiB")


def ask(page: Any, text: str, files: list[str] = (), button: str | None = None) -> None:
    if files:
        page.set_input_files("#files", files)
    page.fill("#input", text)
    page.click(button) if button else page.press("#input", "Enter")
    page.wait_for_selector(".turn.assistant:not([data-status=streaming])", state="attached")
    page.wait_for_timeout(400)  # thumbnails and the overlay settle
    page.locator(".turn").last.scroll_into_view_if_needed()


def screenshots(browser: Any, base: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 820, "height": 760})
    page.goto(base + "/")
    page.wait_for_selector("#model option[value='qwenvl-demo']", state="attached")
    picture = str(example_image_path())
    ask(page, "Output the color and number of each box.", [picture])
    save(page, out, "answer.png")
    page.click("#new-chat")
    ask(page, "the box with the number 7", [picture], button="#find")
    page.locator(".found").scroll_into_view_if_needed()
    save(page, out, "find.png")
    page.click("#new-chat")
    with tempfile.TemporaryDirectory() as tmp:
        clip, question = demo_clip(Path(tmp) / "when.mp4")
        page.click("#settings summary")
        page.fill("#video-fps", str(VIDEO_FPS))
        page.fill("#video-max-pixels", str(VIDEO_SIDE * VIDEO_SIDE))
        page.click("#settings summary")
        ask(page, question, [str(clip)])
    save(page, out, "video.png")
    page.click("#new-chat")
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.png"
        Image.new("RGB", (600, 600), (40, 90, 160)).save(big)
        ask(page, "What is in these pictures?", [picture, str(big)])
    save(page, out, "refused.png")
    page.close()
    small = browser.new_page(viewport={"width": 400, "height": 760})
    small.goto(base + "/")
    small.wait_for_selector("#model option[value='qwenvl-demo']", state="attached")
    small.click("#settings summary")
    small.fill("#max-tokens", "2000")
    small.fill("#extra", '{"ignore_eos": true}')
    small.click("#settings summary")
    small.set_input_files("#files", [picture])
    small.fill("#input", "Output the color and number of each box.")
    small.press("#input", "Enter")
    small.wait_for_timeout(600)
    small.click("#stop")
    small.wait_for_selector(".turn.assistant[data-status=stopped]")
    save(small, out, "stopped-400px.png")
    small.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loads", type=int, default=10, help="cold page loads to time")
    ap.add_argument("--screenshots", type=Path, help="write a screenshot of each state here")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    files = {f.name: f.stat().st_size for f in sorted(WEB_DIR.iterdir())}
    print(f"page files: {sum(files.values())} bytes ({files})")
    port = free_port()
    proc = start_server(port)
    base = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            m = measure_loads(browser, base, args.loads)
            fcp = m["fcp_ms"]
            print(
                f"first contentful paint over {args.loads} cold loads: median "
                f"{statistics.median(fcp):.0f} ms, max {max(fcp):.0f} ms (first {fcp[0]:.0f}); "
                f"DOMContentLoaded median {statistics.median(m['dcl_ms']):.0f} ms; "
                f"transferred {max(m['bytes'])} bytes"
            )
            if args.screenshots:
                screenshots(browser, base, args.screenshots)
            browser.close()
    finally:
        proc.kill()
        proc.wait(10)


if __name__ == "__main__":
    main()
