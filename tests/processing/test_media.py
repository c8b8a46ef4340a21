"""Tests for qwenvl.processing.media: every source kind, limits and error messages (no internet)."""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl.errors import ConfigError, MediaError, MediaTimeoutError, MediaTooLargeError
from qwenvl.processing.media import MediaPolicy, fetch_url, image_content_hash, load_image


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


@pytest.fixture(scope="module")
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------------------------------------
# every source kind


def test_pil_source_is_converted_and_copied():
    rgba = noise(channels=4)
    out = load_image(rgba)
    assert out.mode == "RGB" and out.size == rgba.size
    rgb = noise()
    out = load_image(rgb)
    assert out is not rgb and same_pixels(out, rgb)


def test_bytes_and_bytearray():
    assert same_pixels(load_image(PNG), IMAGE)
    assert same_pixels(load_image(bytearray(PNG)), IMAGE)


def test_local_paths_and_file_urls(tmp_path: Path):
    path = tmp_path / "a b.png"  # a space: file URLs percent-encode it
    path.write_bytes(PNG)
    for source in (path, str(path), path.as_uri(), f"  {path.as_uri()}  "):
        out = load_image(source)
        assert out.mode == "RGB" and same_pixels(out, IMAGE), source


def test_data_uri_and_raw_base64():
    b64 = base64.b64encode(PNG).decode()
    assert same_pixels(load_image(f"data:image/png;base64,{b64}"), IMAGE)
    assert same_pixels(load_image(f"data:image;base64,{b64}"), IMAGE)  # qwen-vl-utils' form
    assert same_pixels(load_image(b64), IMAGE)
    assert same_pixels(load_image(base64.urlsafe_b64encode(PNG).decode().rstrip("=")), IMAGE)
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert same_pixels(load_image(wrapped), IMAGE)


def test_http_url(server):
    assert same_pixels(load_image(f"{server}/img.png"), IMAGE)
    assert fetch_url(f"{server}/img.png", MediaPolicy()) == PNG


def test_http_redirects(server):
    # /redirect/n answers with n + 1 redirects before the image
    assert same_pixels(load_image(f"{server}/redirect/4"), IMAGE)
    with pytest.raises(MediaError, match="too many redirects"):
        load_image(f"{server}/redirect/5")
    assert same_pixels(load_image(f"{server}/redirect/0", MediaPolicy(max_redirects=1)), IMAGE)
    with pytest.raises(MediaError, match="too many redirects"):
        load_image(f"{server}/redirect/0", MediaPolicy(max_redirects=0))
    with pytest.raises(MediaError, match="file:///etc/hostname"):
        load_image(f"{server}/to-file")


def test_exif_orientation_is_applied(tmp_path: Path):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    image.paste((10, 10, 200), (0, 0, 10, 20))  # a blue band on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(image, "JPEG", exif=exif, quality=95)
    out = load_image(data)
    assert out.size == (20, 40)
    # after a clockwise turn the left edge is on top
    top, bottom = np.asarray(out)[1, 10], np.asarray(out)[-2, 10]
    assert top[2] > 150 and bottom[0] > 150
    assert load_image(Image.open(io.BytesIO(data))).size == (20, 40)


def test_modes_become_rgb():
    for image in (noise(channels=4), Image.new("L", (5, 5)), Image.new("I;16", (5, 5), 300)):
        assert load_image(encode(image)).mode == "RGB"


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_file_and_directory(tmp_path: Path):
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="not found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(MediaError, match="not found"):
        load_image((tmp_path / "missing.png").as_uri())
    with pytest.raises(MediaError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(MediaError, match="directory"):
        load_image(str(tmp_path))


def test_truncated_jpeg_is_an_error(tmp_path: Path):
    data = encode(noise(64, 64), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated") as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(MediaError, match="truncated"):
        load_image(Image.open(io.BytesIO(data[: len(data) // 2])))


def test_truncated_png_is_an_error():
    data = encode(noise(64, 64))
    with pytest.raises(MediaError):
        load_image(data[: len(data) - 200])


def test_not_an_image():
    with pytest.raises(MediaError, match="not an image"):
        load_image(b"%PDF-1.4 definitely not a picture")
    with pytest.raises(MediaError, match="empty"):
        load_image(b"")


def test_invalid_base64():
    with pytest.raises(MediaError, match="invalid base64"):
        load_image("!!not*base64!!" * 200)
    with pytest.raises(MediaError, match="invalid base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(MediaError, match="media type"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(MediaError, match="malformed"):
        load_image("data:image/png;base64")
    # short strings that are neither files nor base64 images get a clear "not found"
    with pytest.raises(MediaError, match="not found|neither"):
        load_image("photos/cat.jpg")
    with pytest.raises(MediaError, match="neither"):
        load_image("abcd")


def test_pixel_limit_checked_from_header():
    with pytest.raises(MediaTooLargeError, match="pixels") as info:
        load_image(PNG, MediaPolicy(max_image_pixels=100))
    assert "max_image_pixels" in str(info.value)
    # header claims 9000x9000 (81 Mpx): rejected by our default limit before decoding
    with pytest.raises(MediaTooLargeError, match="81000000 pixels"):
        load_image(png_with_header_size(9000, 9000))
    with pytest.raises(MediaTooLargeError, match="pixels"):
        load_image(Image.new("1", (9000, 9000)))


def test_short_base64_pixel_bomb_keeps_its_type():
    # ~100 characters: short enough to be taken for a path too, yet it is a (bomb) image
    bomb = base64.b64encode(png_with_header_size(9000, 9000)).decode()
    assert len(bomb) < 1024
    with pytest.raises(MediaTooLargeError, match="81000000 pixels"):
        load_image(bomb)


def test_pil_decompression_bomb_error_becomes_media_error():
    # 400 Mpx: over 2x PIL's MAX_IMAGE_PIXELS, so Image.open itself raises
    with pytest.raises(MediaTooLargeError, match="decompression bomb") as info:
        load_image(png_with_header_size(20000, 20000), MediaPolicy(max_image_pixels=10**9))
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


def test_pil_decompression_bomb_warning_as_error_becomes_media_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(MediaTooLargeError, match="decompression bomb"):
            load_image(png_with_header_size(10000, 10000))


def test_byte_limits(tmp_path: Path, server):
    # every size limit raises MediaTooLargeError: the server answers that type with 413
    policy = MediaPolicy(max_bytes=1000)
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        load_image(PNG, policy)
    path = tmp_path / "x.png"
    path.write_bytes(PNG)
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        load_image(path, policy)
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        load_image(base64.b64encode(PNG).decode(), policy)
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        load_image(f"data:image/png;base64,{base64.b64encode(PNG).decode()}", policy)
    with pytest.raises(MediaTooLargeError, match="1000 bytes"):
        load_image("data:image/png," + "%00" * 1500, policy)  # percent-encoded, not base64
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        fetch_url(f"{server}/big", policy)  # rejected from Content-Length
    with pytest.raises(MediaTooLargeError, match="max_bytes"):
        fetch_url(f"{server}/stream", policy)  # counted while streaming
    assert len(fetch_url(f"{server}/stream", MediaPolicy(max_bytes=5000))) == 5000


def test_http_errors(server):
    with pytest.raises(MediaError, match="HTTP 404"):
        load_image(f"{server}/nope.png")
    with pytest.raises(MediaError, match="not an image"):
        load_image(f"{server}/not-image")


def test_unreachable_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MediaError, match="cannot reach"):
        load_image(f"http://127.0.0.1:{port}/x.png", MediaPolicy(timeout_s=2))


def test_timeout(server):
    start = time.monotonic()
    with pytest.raises(MediaTimeoutError, match="timed out after 0.3 s fetching"):
        load_image(f"{server}/sleep", MediaPolicy(timeout_s=0.3))
    assert time.monotonic() - start < 1.4


def test_unsupported_schemes_and_types():
    for url in ("ftp://example.com/x.png", "s3://bucket/key.png", "gopher://x"):
        with pytest.raises(MediaError, match="unsupported URL scheme"):
            load_image(url)
    with pytest.raises(MediaError, match="unsupported URL scheme"):
        fetch_url("file:///etc/hostname", MediaPolicy())
    with pytest.raises(MediaError, match="unsupported image source"):
        load_image(123)  # type: ignore[arg-type]
    with pytest.raises(MediaError, match="empty"):
        load_image("   ")


def test_policy_switches(tmp_path: Path, server):
    path = tmp_path / "x.png"
    path.write_bytes(PNG)
    no_files = MediaPolicy(allow_local_files=False)
    for source in (path, str(path), path.as_uri()):
        with pytest.raises(MediaError, match="disabled"):
            load_image(source, no_files)
    assert same_pixels(load_image(PNG, no_files), IMAGE)  # bytes need no file access
    with pytest.raises(MediaError, match="disabled"):
        load_image(f"{server}/img.png", MediaPolicy(allow_http=False))


def test_policy_validation():
    with pytest.raises(ConfigError):
        MediaPolicy(timeout_s=0)
    with pytest.raises(ConfigError):
        MediaPolicy(max_bytes=-1)
    with pytest.raises(ConfigError):
        MediaPolicy(max_redirects=-1)


def test_errors_are_media_errors_with_causes(tmp_path: Path):
    # Callers catch MediaError (a ValueError) only; library exceptions stay as the __cause__.
    with pytest.raises(MediaError) as info:
        load_image(b"\x89PNG\r\n\x1a\n garbage")
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is not None


# ---------------------------------------------------------------------------------------------
# the whole-fetch deadline: senders that drip bytes cannot hold the fetching thread

_SLOW_POLICY = MediaPolicy(timeout_s=1.0)


def _run_handler(handle: Callable[[socket.socket], None], conn: socket.socket) -> None:
    with conn:
        try:
            handle(conn)
        except OSError:  # the client hung up: what a handler dripping to a timed-out fetch sees
            pass


@contextlib.contextmanager
def raw_server(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP server on a loopback port running ``handle(conn)`` in a thread per connection.

    On exit it checks that every handler thread has ended: a fetch that gave up must close its
    connection, so a dripping sender notices and stops instead of leaking a thread.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()
    handlers: list[threading.Thread] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            thread = threading.Thread(target=_run_handler, args=(handle, conn), daemon=True)
            thread.start()
            handlers.append(thread)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        acceptor.join(2)
        listener.close()
        for thread in handlers:
            thread.join(3)
        assert not any(t.is_alive() for t in handlers), "a handler thread is still sending"


def dripper(head: bytes, drip: bytes, interval: float = 0.3, for_s: float = 5.0):
    """Read the request, send ``head``, then ``drip`` every ``interval`` s for ``for_s`` s."""

    def handle(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(head)
        end = time.monotonic() + for_s
        while time.monotonic() < end:
            time.sleep(interval)
            conn.sendall(drip)

    return handle


def fetch_threads_end() -> bool:
    """Whether the fetch's watchdog and DNS helper threads have all ended (within 1 s)."""
    for _ in range(100):
        if not any(t.name.startswith("qwenvl-fetch") for t in threading.enumerate()):
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize(
    ("scheme", "head", "drip"),
    [
        ("http", b"", b"H"),  # the status line, a byte at a time
        ("http", b"HTTP/1.0 200 OK\r\nX-Slow: ", b"a"),  # a header that never ends
        ("http", b"HTTP/1.0 200 OK\r\n\r\n", b"x"),  # a body with no Content-Length
        ("http", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x"),  # never reaches 100
        ("https", b"\x16\x03\x03\x40\x00", b"\x00"),  # a TLS handshake record, a byte at a time
    ],
    ids=["status-line", "headers", "body-no-length", "body-short-length", "tls-handshake"],
)
def test_dripping_sender_is_cut_at_the_deadline(scheme: str, head: bytes, drip: bytes):
    # Each byte resets a per-operation socket timeout, so only a whole-fetch deadline ends these.
    # The body cases also check that a read the watchdog cut short (EOF) is not returned as data.
    with raw_server(dripper(head, drip)) as port:
        start = time.monotonic()
        with pytest.raises(MediaTimeoutError, match="timed out after 1 s fetching") as info:
            fetch_url(f"{scheme}://127.0.0.1:{port}/img.png", _SLOW_POLICY)
        assert time.monotonic() - start < 2.5
    assert not isinstance(info.value, MediaTooLargeError)
    assert fetch_threads_end()


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (cert, key), made with the openssl tool."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext"]
        + ["subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_dripping_sender_over_tls_is_cut_at_the_deadline(
    tls_cert: tuple[str, str], monkeypatch: pytest.MonkeyPatch
):
    # By the time the body is read, urllib has dropped the connection's socket and TLS has
    # detached the one we created: the watchdog must still reach the connection.
    cert, key = tls_cert
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=cert)
    monkeypatch.setattr(ssl, "_create_default_https_context", lambda: client_context)
    drip = dripper(b"HTTP/1.0 200 OK\r\n\r\n", b"x")

    def handle(conn: socket.socket) -> None:
        with server_context.wrap_socket(conn, server_side=True) as tls:
            drip(tls)

    with raw_server(handle) as port:
        start = time.monotonic()
        with pytest.raises(MediaTimeoutError, match="timed out after 1 s fetching https"):
            fetch_url(f"https://127.0.0.1:{port}/img.png", _SLOW_POLICY)
        assert time.monotonic() - start < 2.5
    assert fetch_threads_end()


def test_deadline_covers_every_redirect_hop(server):
    # six hops of 0.5 s: each is far under the timeout, all of them together are not
    start = time.monotonic()
    with pytest.raises(MediaTimeoutError, match="timed out"):
        fetch_url(f"{server}/slow-hop/5", MediaPolicy(timeout_s=1.0, max_redirects=10))
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("safe", [False, True])
def test_deadline_covers_dns(server, monkeypatch: pytest.MonkeyPatch, safe: bool):
    real_getaddrinfo = socket.getaddrinfo
    release = threading.Event()

    def getaddrinfo(host, port, *args, **kw):
        if host == "slow.test":
            release.wait(5)  # a resolver that takes its time
            host = "127.0.0.1"
        return real_getaddrinfo(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    url = f"http://slow.test:{server.rsplit(':', 1)[1]}/img.png"
    policy = MediaPolicy.safe(allowed_domains=("slow.test",), timeout_s=1.0) if safe else None
    start = time.monotonic()
    try:
        with pytest.raises(MediaTimeoutError, match="timed out"):
            fetch_url(url, policy or _SLOW_POLICY)
        assert time.monotonic() - start < 2.5
    finally:
        release.set()


def test_slow_but_finishing_downloads_work(server):
    body = b"abcdefgh"

    def handle(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\n")
        for byte in body:  # 0.8 s in all, under the 3 s deadline
            time.sleep(0.1)
            conn.sendall(bytes([byte]))

    with raw_server(handle) as port:
        assert fetch_url(f"http://127.0.0.1:{port}/x", MediaPolicy(timeout_s=3.0)) == body
    # two hops of 0.5 s each under a 3 s deadline
    assert fetch_url(f"{server}/slow-hop/1", MediaPolicy(timeout_s=3.0)) == PNG
    assert fetch_threads_end()


def test_fast_download_is_whole_and_leaves_no_thread(server):
    data = fetch_url(f"{server}/large", MediaPolicy(timeout_s=5.0))
    assert data == b"y" * (3 * 1024 * 1024)
    assert fetch_threads_end()


# ---------------------------------------------------------------------------------------------
# error types and URLs that are refused


def test_redirect_loop_is_a_bad_url_not_a_size_error(server):
    with pytest.raises(MediaError, match="too many redirects") as info:
        fetch_url(f"{server}/loop", MediaPolicy())
    assert not isinstance(info.value, MediaTooLargeError)
    # and no wording that a server matching messages would take for "too large" (413)
    message = str(info.value)
    assert not any(w in message for w in ("more than", "over the limit", "too large"))


def test_userinfo_urls_are_refused(server):
    port = int(server.rsplit(":", 1)[1])
    for url in (
        f"http://user:secret@127.0.0.1:{port}/img.png",
        f"http://user@127.0.0.1:{port}/img.png",
        f"https://example.com@127.0.0.1:{port}/img.png",
    ):
        with pytest.raises(MediaError, match=r"user name or password \(user@host\)") as info:
            load_image(url)
        assert "secret" not in str(info.value)
    # a redirect hop to such a URL is refused too, under either kind of policy
    safe = MediaPolicy.safe(allowed_domains=("127.0.0.1",))
    for policy in (MediaPolicy(), safe):
        with pytest.raises(MediaError, match="user name or password") as info:
            fetch_url(f"{server}/to-userinfo", policy)
        assert "redirects there" in str(info.value) and "secret" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# content hash


def test_image_content_hash():
    a = noise(seed=1)
    assert image_content_hash(a) == image_content_hash(a.copy())
    assert image_content_hash(a) == image_content_hash(load_image(encode(a)))
    assert image_content_hash(a) != image_content_hash(noise(seed=2))
    assert image_content_hash(a) != image_content_hash(a.convert("RGBA"))
    flat = Image.new("RGB", (4, 6))
    assert image_content_hash(flat) != image_content_hash(Image.new("RGB", (6, 4)))
    p1 = Image.new("P", (4, 4))
    p2 = p1.copy()
    p2.putpalette([255, 0, 0] * 256)
    assert image_content_hash(p1) != image_content_hash(p2)
    assert len(image_content_hash(a)) == 64
