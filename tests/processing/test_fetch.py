"""Tests for qwenvl.processing.fetch: downloads, their errors, the whole-fetch deadline against
senders that drip bytes, redirects and user@host URLs (loopback servers only)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from media_helpers import PNG

from qwenvl.errors import MediaError, MediaTimeoutError, MediaTooLargeError
from qwenvl.processing.fetch import fetch_url
from qwenvl.processing.media import load_image
from qwenvl.processing.policy import MediaPolicy


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
