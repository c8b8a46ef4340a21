"""The chat page of ``qwenvl serve``, driven in a real headless Chromium (Debian's ``chromium``,
through Playwright) against a real ``qwenvl serve`` of the bundled demo model.

The truths are independent of the page: the demo scene's known blocks (`qwenvl.demo`), the
README's answer, hand-computed resize and frame sampling, frames that show their own index
(`video_clips`), the server's Prometheus counters, and pixels read back from screenshots.
One server (with an API key and a small pixel limit) and one browser serve the whole module;
the last test kills the server on purpose.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from processes import free_port, wait_ready

try:
    from playwright.sync_api import expect
except ImportError:  # the browser tests skip (see _playwright)
    expect = None
from video_clips import index_of, make_video

CHROMIUM = "/usr/bin/chromium"
KEY = "web-test-key"
MAX_IMAGE_PIXELS = 250_000  # the server's limit: a 600 x 600 picture is refused
README_QUESTION = "Output the color and number of each box."
README_ANSWER = "brown 4\nbrown 9, green 8\ngreen 0, pink 7, pink 2"
FOUND = (0, 229, 255)  # the page's grounding stroke (style.css --found)
WEB_DIR = Path(__file__).parents[2] / "src" / "qwenvl" / "server" / "web"


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(
            f"no browser: {CHROMIUM} is missing (Debian's chromium package; .ci/run installs it "
            "with apt-get where it can)"
        )
    return sync_playwright


@dataclass
class Served:
    base: str
    proc: subprocess.Popen
    browser: Any
    logs: list[tuple[str, str]] = field(default_factory=list)

    def aborted(self) -> int:
        text = httpx.get(
            f"{self.base}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
        ).text
        line = next(x for x in text.splitlines() if x.startswith("qwenvl_aborted_requests_total"))
        return int(float(line.split()[-1]))


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    sync_playwright = _playwright()
    port = free_port()
    cmd = [sys.executable, "-m", "qwenvl", "serve", "--port", str(port), "--api-key", KEY]
    cmd += ["--max-image-pixels", str(MAX_IMAGE_PIXELS)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, [proc])
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            yield Served(f"http://127.0.0.1:{port}", proc, browser)
            browser.close()
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def page(served: Served) -> Iterator[Any]:
    """A fresh page, key entered, models listed. The test fails on any request beyond the
    server, and on any console or page error but those it names in ``page.expected_errors``
    (Chromium logs each refused request and each cut stream as a failed resource)."""
    context = served.browser.new_context(viewport={"width": 900, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    others: list[str] = []
    pg.on("request", lambda r: others.append(r.url) if not _own(r.url, served.base) else None)
    pg.goto(served.base + "/")
    pg.wait_for_selector("#key-field:not([hidden])")  # the server has a key: the page asks
    pg.fill("#api-key", KEY)
    pg.locator("#api-key").dispatch_event("change")
    pg.wait_for_selector("#model option[value='qwenvl-demo']", state="attached")
    pg.expected_errors = []
    yield pg
    context.close()
    assert others == [], f"the page reached beyond its server: {others}"
    assert [e for e in errors if not any(x in e for x in pg.expected_errors)] == []


def _own(url: str, base: str) -> bool:
    return url.startswith((base + "/", "data:", "blob:"))


def _ask(pg: Any, text: str, files: list[Path | str] = (), button: str | None = None) -> Any:
    if files:
        pg.set_input_files("#files", [str(f) for f in files])
    pg.fill("#input", text)
    if button:
        pg.click(button)
    else:
        pg.press("#input", "Enter")
    turn = pg.locator(".turn.assistant").last
    _settled(turn)
    return turn


def _settled(turn: Any, status: str | None = None, timeout: float = 60_000) -> None:
    """Until the answer ``turn`` is no longer streaming (and has ``status``, if given)."""
    if status is None:
        expect(turn).not_to_have_attribute("data-status", "streaming", timeout=timeout)
    else:
        expect(turn).to_have_attribute("data-status", status, timeout=timeout)


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


# --- the tests -------------------------------------------------------------------------------
def test_page_is_small_and_paints_within_a_second(served: Served) -> None:
    weight = sum(f.stat().st_size for f in WEB_DIR.iterdir())
    assert weight < 150_000, f"the page's own files weigh {weight} bytes"
    context = served.browser.new_context()
    pg = context.new_page()
    got: dict[str, int] = {}
    pg.on("response", lambda r: got.__setitem__(r.url, int(r.headers.get("content-length", 0))))
    paints = []
    for _ in range(3):  # the first load is cold (nothing cached): it counts too
        pg.goto(served.base + "/")
        pg.wait_for_selector("#input")
        paint = pg.evaluate(
            "performance.getEntriesByType('paint')"
            ".filter(e => e.name === 'first-contentful-paint')[0]?.startTime"
        )
        paints.append(paint)
    context.close()
    assert all(p is not None and p < 1000 for p in paints), paints
    files = {u.rsplit("/", 1)[-1] for u in got if "/web/" in u}
    assert {"app.js", "api.js", "media.js", "overlay.js", "style.css"} <= files
    assert sum(n for u, n in got.items() if "/v1/" not in u) < 150_000


def test_readme_question_streams_the_answer(served: Served, page: Any) -> None:
    from qwenvl.demo import example_image_path

    # every text the answer showed, as it streamed in
    page.evaluate(
        """() => { window.__seen = [];
        new MutationObserver(() => { const t = document.querySelector('.assistant .text');
          if (t) window.__seen.push(t.textContent); })
        .observe(document.querySelector('#chat'), {subtree: true, childList: true,
                 characterData: true}); }"""
    )
    models = httpx.get(f"{served.base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    ids = [m["id"] for m in models.json()["data"]]
    assert page.locator("#model option").all_inner_texts() == ids == ["qwenvl-demo"]
    turn = _ask(page, README_QUESTION, [example_image_path()])
    assert turn.get_attribute("data-status") == "done"
    assert turn.locator(".text").inner_text() == README_ANSWER
    seen = [s for s in page.evaluate("window.__seen") if s]
    partial = {s for s in seen if s != README_ANSWER}
    assert partial and all(README_ANSWER.startswith(s) for s in partial), seen
    # 280 x 280 seen at the demo model's max_pixels 19600 = 140 x 140: (140 / 28)^2 tokens
    meta = page.locator(".turn.user .item .meta").inner_text()
    assert meta == "280×280 → 140×140 px · 25 tokens"
    # copy puts the answer on the clipboard; retry asks again and gets the same answer
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    turn.locator("button.copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == README_ANSWER
    turn.locator("button.retry").click()
    again = page.locator(".turn.assistant").last
    _settled(again, "done")
    assert page.locator(".turn.assistant").count() == 1
    assert again.locator(".text").inner_text() == README_ANSWER


def _found_pixels(image: Image.Image) -> np.ndarray:
    a = np.asarray(image.convert("RGB"), dtype=np.int32)
    return (np.abs(a - np.array(FOUND)).sum(axis=2) < 60).nonzero()


def test_find_draws_the_box_on_the_block(served: Served, page: Any) -> None:
    from qwenvl.demo import example_image_path, example_scene
    from qwenvl.demo.scenes import COLOURS

    turn = _ask(page, "the box with the number 7", [example_image_path()], button="#find")
    assert '"label": "the box with the number 7"' in turn.locator(".text").inner_text()
    canvas = turn.locator(".found .canvas")
    shot = Image.open(io.BytesIO(canvas.screenshot()))
    box = canvas.bounding_box()
    scale = 280 / box["width"]  # screen pixels -> pixels of the 280 x 280 picture
    ys, xs = _found_pixels(shot)
    assert len(xs) > 50, "no box drawn"
    drawn = [xs.min() * scale, ys.min() * scale, (xs.max() + 1) * scale, (ys.max() + 1) * scale]
    block = example_scene().by_number(7)
    # the 2-px stroke is centred on the box's edges; the model may be a pixel or two off
    assert np.allclose(drawn, block.box, atol=4), (drawn, block.box)
    pixels = np.asarray(shot.convert("RGB"))
    inside = pixels[ys.min() + 4 : ys.max() - 3, xs.min() + 4 : xs.max() - 3]
    pink = np.abs(inside.astype(int) - COLOURS[block.colour]).sum(axis=2) < 40
    assert pink.mean() > 0.6, "the drawn box does not sit on the pink block"
    # the toggle hides the boxes
    turn.locator(".found input[type=checkbox]").uncheck()
    assert len(_found_pixels(Image.open(io.BytesIO(canvas.screenshot())))[0]) == 0


def test_points_and_quads_are_drawn_in_place(served: Served, page: Any) -> None:
    """The overlay for the other grounding kinds (the demo model only grounds boxes): a point
    and a quad in a 400 x 200 picture's pixels, shown at 200 x 100."""
    page.evaluate(
        """async () => {
        const { groundingLayer } = await import('/web/overlay.js');
        const probe = document.createElement('div');
        probe.id = 'probe';
        probe.className = 'canvas';
        Object.assign(probe.style, {position: 'relative', width: '200px', height: '100px',
                                    background: '#fff'});
        probe.append(groundingLayer([
          {kind: 'point', x: 100, y: 50, label: 'p'},
          {kind: 'quad', points: [[300, 20], [380, 20], [380, 100], [300, 100]], label: 'q'},
        ], 400, 200));
        document.body.prepend(probe); }"""
    )
    ys, xs = _found_pixels(Image.open(io.BytesIO(page.locator("#probe").screenshot())))
    dot, quad = xs < 100, xs >= 100
    # the point: a dot of radius 400 / 80 = 5 picture pixels (2.5 on screen) around (50, 25)
    assert abs(xs[dot].mean() - 50) < 1 and abs(ys[dot].mean() - 25) < 1
    assert xs[dot].max() - xs[dot].min() <= 6
    # the quad's corners (300, 20) .. (380, 100) halved: (150, 10) .. (190, 50)
    got = [xs[quad].min(), ys[quad].min(), xs[quad].max() + 1, ys[quad].max() + 1]
    assert np.allclose(got, [150, 10, 190, 50], atol=1.5), got


def test_video_turn_shows_its_frames_at_their_times(
    served: Served, page: Any, tmp_path: Path
) -> None:
    clip = make_video(tmp_path / "clip.mp4", 32, 8)  # 4 s at 8 fps, each frame shows its index
    turn = _ask(page, "At what second does the box with the number 3 appear?", [clip])
    assert turn.get_attribute("data-status") == "done"
    # qwen-vl-utils: 4 s at 2 fps = 8 frames, indices round(linspace(0, 31, 8)), at index / 8 s
    indices = [round(x) for x in np.linspace(0, 31, 8)]
    assert indices == [0, 4, 9, 13, 18, 22, 27, 31]
    frames = page.locator(".turn.user .strip .frame")
    frames.nth(7).locator("canvas").wait_for()
    labels = [frames.nth(k).locator("figcaption").inner_text() for k in range(frames.count())]
    assert [x.endswith(" s") for x in labels] == [True] * 8, labels
    shown = [float(x.removesuffix(" s")) for x in labels]  # rounded to 2 decimals
    assert np.allclose(shown, [i / 8 for i in indices], atol=0.0051), labels
    for k, i in enumerate(indices):
        thumb = Image.open(io.BytesIO(frames.nth(k).locator("canvas").screenshot()))
        assert index_of(thumb) == i, f"thumbnail {k} shows frame {index_of(thumb)}, not {i}"


def test_refused_image_shows_the_servers_message(served: Served, page: Any, tmp_path: Path) -> None:
    from qwenvl.demo import example_image_path

    big = tmp_path / "big.png"
    big.write_bytes(_png((600, 600), (200, 30, 30)))
    page.expected_errors = ["Failed to load resource: the server responded with a status of 413"]
    turn = _ask(page, "What is this?", [example_image_path(), big])
    assert turn.get_attribute("data-status") == "error"
    items = page.locator(".turn.user .item")
    refused = items.nth(1).locator(".err")
    assert refused.is_visible()
    message = refused.inner_text()
    assert "600x600" in message and str(MAX_IMAGE_PIXELS) in message and "413" in message
    assert not items.nth(0).locator(".err").is_visible()  # the good picture is not blamed
    assert "Refused (413" in turn.locator(".status").inner_text()
    assert page.locator("#send").is_visible() and page.locator("#stop").is_hidden()
    # the refused turn is left out of the next request: the conversation goes on
    turn = _ask(page, README_QUESTION, [example_image_path()])
    assert turn.locator(".text").inner_text() == README_ANSWER
    # a reply that cannot fit the context (the demo model's is 4096 tokens)
    page.expected_errors.append("the server responded with a status of 400")
    page.click("#settings summary")
    page.fill("#max-tokens", "5000")
    turn = _ask(page, "And now?")
    status = turn.locator(".status").inner_text()
    assert turn.get_attribute("data-status") == "error"
    assert "Refused (400" in status and "4096" in status, status


def test_stop_aborts_the_request(served: Served, page: Any) -> None:
    before = served.aborted()
    page.click("#settings summary")
    page.fill("#max-tokens", "3000")
    page.fill("#extra", '{"ignore_eos": true}')  # the demo model would stop within a line
    page.fill("#input", "Count.")
    page.press("#input", "Enter")
    turn = page.locator(".turn.assistant").last
    deadline = time.monotonic() + 30
    while len(turn.locator(".text").inner_text()) < 10:
        assert time.monotonic() < deadline, "no answer streamed"
        time.sleep(0.05)
    page.click("#stop")
    _settled(turn, "stopped", 5000)
    assert "aborted" in turn.locator(".status").inner_text()
    deadline = time.monotonic() + 10
    while served.aborted() != before + 1:
        assert time.monotonic() < deadline, f"aborted_requests_total stayed {served.aborted()}"
        time.sleep(0.1)
    assert page.locator("#send").is_visible()


def test_keyboard_and_small_screen(served: Served, page: Any) -> None:
    page.set_viewport_size({"width": 400, "height": 800})
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")
    page.locator("#input").press_sequentially("second")
    assert page.input_value("#input") == "first line\nsecond"
    assert page.locator(".turn").count() == 0  # Shift+Enter did not send
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, f"the page is {width} px wide at 400"
    for sel in ("#input", "#send", "#find", "label.attach", "#model", "#settings summary"):
        b = page.locator(sel).bounding_box()
        assert b and b["x"] >= 0 and b["x"] + b["width"] <= 400, (sel, b)
    page.press("#input", "Enter")
    _settled(page.locator(".turn.assistant").last)
    assert page.locator(".turn.user .text").inner_text() == "first line\nsecond"
    page.click("#settings summary")
    low = {sel: r for sel, r in _contrasts(page).items() if r < 4.5}
    assert low == {}, f"text below WCAG AA contrast (4.5:1): {low}"


# Each visible text element's colour and the first opaque background behind it.
_COLOURS = """sels => sels.flatMap(sel => [...document.querySelectorAll(sel)]
  .filter(e => e.offsetParent !== null && e.textContent.trim())
  .map((e, i) => { let b = e, bg = 'rgba(0, 0, 0, 0)';
    while (b && (bg = getComputedStyle(b).backgroundColor).endsWith(', 0)')) b = b.parentElement;
    return [`${sel}#${i}`, getComputedStyle(e).color, b ? bg : 'rgb(255, 255, 255)']; }))"""
_TEXT = ["h1", ".field", "button", "summary", ".settings label", ".hint", ".turn .text", ".meta"]
_TEXT += [".status", ".err", ".notice", "#input"]


def _contrasts(page: Any) -> dict[str, float]:
    """WCAG 2 contrast ratio of each visible text element against its background."""

    def luminance(css: str) -> float:
        rgb = [float(x) / 255 for x in css[css.index("(") + 1 : -1].split(",")[:3]]
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    out = {}
    for name, fg, bg in page.evaluate(_COLOURS, _TEXT):
        hi, lo = sorted((luminance(fg), luminance(bg)), reverse=True)
        out[name] = (hi + 0.05) / (lo + 0.05)
    assert len(out) > 10, out
    return out


def test_drop_and_paste_attach_files(served: Served, page: Any) -> None:
    from qwenvl.demo import example_image_path

    png = list(example_image_path().read_bytes())
    handle = page.evaluate_handle(
        """bytes => { const t = new DataTransfer();
        t.items.add(new File([new Uint8Array(bytes)], 'blocks.png', {type: 'image/png'}));
        return t; }""",
        png,
    )
    page.dispatch_event("main", "drop", {"dataTransfer": handle})
    expect(page.locator("#pending .chip")).to_have_count(1)
    page.evaluate(
        """t => document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: t,
            bubbles: true}))""",
        handle,
    )
    expect(page.locator("#pending .chip")).to_have_count(2)
    page.locator("#pending .chip .remove").first.click()
    expect(page.locator("#pending .chip")).to_have_count(1)
    turn = _ask(page, README_QUESTION)
    assert turn.locator(".text").inner_text() == README_ANSWER
    assert page.locator(".turn.user .item").count() == 1


def test_dropped_connection_is_reported(served: Served, page: Any) -> None:
    """Last: kills the module's server mid-answer."""
    page.click("#settings summary")
    page.fill("#max-tokens", "3000")
    page.fill("#extra", '{"ignore_eos": true}')
    page.fill("#input", "Count.")
    page.press("#input", "Enter")
    turn = page.locator(".turn.assistant").last
    deadline = time.monotonic() + 30
    while not turn.locator(".text").inner_text():
        assert time.monotonic() < deadline, "no answer streamed"
        time.sleep(0.05)
    served.proc.send_signal(signal.SIGKILL)
    _settled(turn, "error", 10_000)
    assert "Connection lost" in turn.locator(".status").inner_text()
    assert page.locator("#send").is_visible()
    page.expected_errors = ["Failed to load resource: net::ERR_INCOMPLETE_CHUNKED_ENCODING"]


# --- without a browser -----------------------------------------------------------------------
def test_no_web_leaves_only_the_api(checkpoints: Any) -> None:
    from server_helpers import start_server

    from qwenvl import LLM
    from qwenvl.cli.main import build_parser
    from qwenvl.cli.serve import server_settings
    from qwenvl.server import ServerSettings

    folder = checkpoints("qwen2_vl")
    parse = build_parser().parse_args
    assert server_settings(parse(["serve", "--model", str(folder), "--no-web"])).web is False
    assert server_settings(parse(["serve", "--model", str(folder)])).web is True
    pages = ("/", "/web/app.js", "/web/style.css", "/web/config.json")
    for web in (True, False):
        running = start_server(LLM(folder, dtype="float32"), ServerSettings(web=web))
        root = next(running).root
        try:
            got = {p: httpx.get(root + p, timeout=10) for p in (*pages, "/v1/models")}
        finally:
            next(running, None)
        assert got["/v1/models"].status_code == 200
        assert [got[p].status_code for p in pages] == [200 if web else 404] * 4
        if web:
            assert got["/"].headers["content-type"].startswith("text/html")
            assert "connect-src 'self'" in got["/"].headers["content-security-policy"]
            assert got["/web/app.js"].headers["content-type"].startswith("text/javascript")
            config = got["/web/config.json"].json()
            assert config["api_key_required"] is False and "{phrase}" in config["find_prompt"]
