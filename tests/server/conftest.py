"""Fixtures for the server tests: real uvicorn servers on loopback ports, a media HTTP server,
and test media (PNG/JPEG/MP4, broken ones too).

``server`` serves a tiny Qwen2-VL checkpoint with an API key, the media server's host trusted and
a local media folder allowed; ``demo_server`` serves the bundled demo model; ``tight`` serves its
own copy with small limits (queue of 1, small bodies and media) for the 413/429 tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from server_helpers import API_KEY, MODEL, Running, jpeg_bytes, mp4_bytes, png_bytes, start_server


# --- the media HTTP server -------------------------------------------------------------------
@dataclass
class MediaServer:
    base: str  # http://127.0.0.1:PORT
    port: int
    release: threading.Event  # /slow waits for it
    hits: dict[str, int]

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"


@pytest.fixture(scope="session")
def media_server() -> Iterator[MediaServer]:
    files = {
        "/red.png": (png_bytes((255, 0, 0)), "image/png"),
        "/green.png": (png_bytes((0, 255, 0), (90, 70)), "image/png"),
        "/blue.jpg": (jpeg_bytes(), "image/jpeg"),
        "/clip.mp4": (mp4_bytes(), "video/mp4"),
        "/big.png": (png_bytes((1, 2, 3), (400, 400)), "image/png"),
    }
    release = threading.Event()
    hits: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            hits[self.path] = hits.get(self.path, 0) + 1
            port = self.server.server_address[1]
            if self.path in files:
                data, mime = files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", mime)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path == "/to-localhost":  # a hop to a host that is not trusted
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/red.png")
                self.end_headers()
            elif self.path == "/to-metadata":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
            elif self.path == "/loop":  # redirects to itself forever
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.end_headers()
            elif self.path == "/to-red":
                self.send_response(302)
                self.send_header("Location", "/red.png")
                self.end_headers()
            elif self.path == "/slow.png":
                release.wait(30)
                data = files["/red.png"][0]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self.send_response(404)
                self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield MediaServer(f"http://127.0.0.1:{port}", port, release, hits)
    release.set()
    httpd.shutdown()


# --- qwenvl servers --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "local.png").write_bytes(png_bytes((10, 200, 30)))
    return root


@pytest.fixture(scope="session")
def server(checkpoints: Any, media_dir: Path) -> Iterator[Running]:
    from qwenvl import LLM
    from qwenvl.server import ServerSettings

    llm = LLM(checkpoints("qwen2_vl"), dtype="float32")
    settings = ServerSettings(
        served_model_name=MODEL,
        api_key=API_KEY,
        allowed_media_domains=("127.0.0.1",),
        allowed_local_media_path=str(media_dir),
        default_max_tokens=8,
        max_redirects=2,
    )
    yield from start_server(llm, settings)


@pytest.fixture(scope="session")
def demo_server() -> Iterator[Running]:
    """The bundled demo model, which calls the click tool; its own image budget (140 x 140
    pixels' area) is below OpenAI's 512 x 512 for ``detail: "low"``."""
    from qwenvl import LLM
    from qwenvl.server import ServerSettings

    yield from start_server(LLM(), ServerSettings(served_model_name=MODEL, api_key=API_KEY))


@pytest.fixture(scope="session")
def tight(checkpoints: Any) -> Iterator[Running]:
    from qwenvl import LLM
    from qwenvl.server import ServerSettings

    llm = LLM(checkpoints("qwen2_vl"), dtype="float32")
    settings = ServerSettings(
        served_model_name=MODEL,
        allowed_media_domains=("127.0.0.1",),
        max_waiting_requests=1,
        max_body_bytes=100_000,
        max_media_bytes=20_000,
        default_max_tokens=4,
    )
    yield from start_server(llm, settings)
