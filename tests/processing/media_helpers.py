"""Media fixtures built by code for the processing tests: images, and a local HTTP server."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def noise(height: int = 24, width: int = 32, seed: int = 0, channels: int = 3) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8))


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


IMAGE = noise()
PNG = encode(IMAGE)


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def png_with_header_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR claims another size (what a decompression bomb looks like)."""
    data = bytearray(encode(Image.new("L", (8, 8))))
    # signature(8) + length(4) + b"IHDR"(4) + width(4) + height(4) ... + crc over type+13 bytes
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# a local HTTP server


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, code: int, body: bytes, length: bool = True, **headers: str) -> None:
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        path = self.path
        if path == "/img.png":
            self._send(200, PNG, Content_Type="image/png")
        elif path == "/big":
            self._send(200, b"x" * 5000)
        elif path == "/stream":  # HTTP/1.0, no Content-Length: the body ends when we close
            self._send(200, b"x" * 5000, length=False)
        elif path == "/sleep":
            time.sleep(1.5)
            self._send(200, PNG)
        elif path == "/large":
            self._send(200, b"y" * (3 * 1024 * 1024))
        elif path.startswith("/slow-hop/"):  # n + 1 redirects of 0.5 s each before the image
            time.sleep(0.5)
            n = int(path.rsplit("/", 1)[1])
            self._send(302, b"", Location="/img.png" if n == 0 else f"/slow-hop/{n - 1}")
        elif path == "/loop":
            self._send(302, b"", Location="/loop")
        elif path == "/to-userinfo":
            port = self.server.server_address[1]
            self._send(302, b"", Location=f"http://user:secret@127.0.0.1:{port}/img.png")
        elif path.startswith("/redirect/"):
            n = int(path.rsplit("/", 1)[1])
            target = "/img.png" if n == 0 else f"/redirect/{n - 1}"
            self._send(302, b"", Location=target)
        elif path == "/to-file":
            self._send(302, b"", Location="file:///etc/hostname")
        elif path == "/not-image":
            self._send(200, b"<html>hello</html>", Content_Type="text/html")
        else:
            self._send(404, b"not found")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # clients that time out on purpose leave broken pipes behind


def serve_http() -> Iterator[str]:
    """A local HTTP server of test images, redirects and slow answers; yields its root URL."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
