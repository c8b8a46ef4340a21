"""Helpers of the server tests: test media, fixed generations, waiting for an idle engine."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from PIL import Image

from qwenvl.outputs import StreamEvent

API_KEY = "test-key"
MODEL = "tiny-qwen2-vl"


# --- media -----------------------------------------------------------------------------------
def png_bytes(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(sum(color) + size[0])
    a = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    a[: size[1] // 2] = color
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(size: tuple[int, int] = (80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 0, 255)).save(buf, "JPEG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims 10 gigapixels (a few hundred bytes on the wire)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def mp4_bytes(n: int = 8, fps: int = 4, size: int = 56) -> bytes:
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = size, size, "yuv420p"
        for i in range(n):
            a = np.full((size, size, 3), i * 30 % 255, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def fix_server_text(
    monkeypatch: pytest.MonkeyPatch, running: Any, text: str, piece: int = 3
) -> list[Any]:
    """Make every completion the server streams read ``text`` (in ``piece``-character events).

    The real generation still runs first (prompt, media and engine as usual); its events are
    replaced. Returns a list that receives each request's ``PromptInputs``.
    """
    engine = running.state.engine
    real = type(engine).generate
    prompts: list[Any] = []
    tok = running.llm.tokenizer

    async def fixed(prompt: Any, params: Any, request_id: str) -> AsyncIterator[StreamEvent]:
        prompts.append(prompt)
        async for _ in real(engine, prompt, params, request_id):
            pass
        pieces = [text[i : i + piece] for i in range(0, len(text), piece)] or [""]
        for index in range(params.n):
            for k, p in enumerate(pieces):
                last = k == len(pieces) - 1
                yield StreamEvent(request_id, index, p, tok.encode(p), "stop" if last else None)

    monkeypatch.setattr(engine, "generate", fixed)
    return prompts


def wait_idle(running: Any, timeout: float = 10.0) -> None:
    """Wait until the engine holds no request and every KV block is free again."""
    engine = running.llm.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.requests and running.state.engine.num_unfinished == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {list(engine.requests)}")


# --- qwenvl servers --------------------------------------------------------------------------
@dataclass
class Running:
    base_url: str  # http://127.0.0.1:PORT/v1
    app: Any
    llm: Any

    @property
    def root(self) -> str:
        return self.base_url[: -len("/v1")]

    def client(self, api_key: str = API_KEY, **kw: Any) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, **kw)

    @property
    def state(self) -> Any:
        return self.app.state.qwenvl


def start_server(llm: Any, settings: Any) -> Iterator[Running]:
    import uvicorn

    from qwenvl.server import create_app, uvicorn_config

    app = create_app(llm, settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(app, settings, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    yield Running(f"http://127.0.0.1:{port}/v1", app, llm)
    server.should_exit = True
    thread.join(timeout=10)
