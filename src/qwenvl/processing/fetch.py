"""Downloading media over http(s) under a `MediaPolicy`: one deadline for the whole fetch, a
byte and a redirect limit, and (under a guarding policy) no private addresses.

A socket timeout bounds one operation, so a watchdog cuts every socket of a fetch at its deadline;
every connection, each redirect hop too, resolves its host once, checks the addresses and connects
to the address it checked (no DNS rebinding).
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any

from qwenvl.errors import MediaError, MediaTimeoutError, MediaTooLargeError
from qwenvl.processing.policy import DEFAULT_POLICY, MediaPolicy
from qwenvl.processing.policy import shorten as _short

_CHUNK = 64 * 1024


def host_is_trusted(host: str, policy: MediaPolicy) -> bool:
    """Whether ``host`` is one of ``policy.allowed_domains`` or under one of them."""
    host = host.lower().strip(".").strip("[]")
    return any(host == d or host.endswith("." + d) for d in policy.allowed_domains)


def address_is_public(ip: str) -> bool:
    """False for loopback, private, link-local (cloud metadata), CGNAT, multicast, reserved and
    unspecified addresses, IPv4-mapped IPv6 included."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


class _Deadline:
    """The time limit of one whole fetch: DNS, connect, headers, every redirect hop and the body.

    A socket timeout bounds one operation only, so a sender that drips a byte every few seconds
    never trips it. A watchdog timer therefore shuts down every socket of the fetch when the time
    is up, which wakes whichever connect, handshake or read is blocked. Such a read may just see
    EOF, so :attr:`expired` is what tells the fetch that its data was cut short.
    """

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.name = "qwenvl-fetch-deadline"
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:  # never close a duplicate while _fire may be shutting it down
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    @property
    def expired(self) -> bool:
        """True once the deadline has passed: data read by then may be truncated."""
        return self._fired or time.monotonic() >= self._end

    def remaining(self) -> float:
        """Seconds left, to clamp socket timeouts to; ``TimeoutError`` once none are left."""
        left = self._end - time.monotonic()
        if left <= 0 or self._fired:
            raise TimeoutError("the fetch deadline has passed")
        return left

    def watch(self, sock: socket.socket) -> None:
        """Hand ``sock`` to the watchdog, as a duplicate descriptor.

        The duplicate names the same connection however it is wrapped later (TLS wraps the socket
        and detaches the original object, even before its handshake), and since we own it, its
        number cannot be reused by an unrelated socket before the watchdog shuts it down.
        """
        dup = sock.dup()
        with self._lock:
            if not self._fired:
                self._sockets.append(dup)
                return
        dup.close()
        raise TimeoutError("the fetch deadline has passed")

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # not connected (yet), or already gone
                    pass


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve(host: str, port: int, deadline: _Deadline, url: str) -> list[Any]:
    """``getaddrinfo`` within the deadline.

    A lookup cannot be interrupted, so it runs in a helper thread that the fetch stops waiting
    for when the time is up (the resolver's own timeouts end that thread later).
    """
    literal = _ip_literal(host)
    if literal is not None:  # no resolver involved: the address is the host
        family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
        sockaddr = (host, port, 0, 0) if literal.version == 6 else (host, port)
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]
    found: list[Any] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as e:  # gaierror, UnicodeError for bad IDNA names...
            found.append(e)

    worker = threading.Thread(target=lookup, name="qwenvl-fetch-dns", daemon=True)
    worker.start()
    worker.join(deadline.remaining())
    if not found:
        raise TimeoutError(f"resolving {host!r} did not finish in time")
    if isinstance(found[0], Exception):
        error = found[0]
        raise MediaError(f"cannot resolve host {host!r} fetching {_short(url)}: {error}") from error
    return found[0]


def _check_addresses(host: str, infos: list[Any], url: str, policy: MediaPolicy) -> None:
    """Under a guarding policy, refuse an untrusted host with any non-public address."""
    if policy.allow_private_networks or host_is_trusted(host, policy):
        return
    for info in infos:
        ip = str(info[4][0])
        if not address_is_public(ip):
            raise MediaError(
                f"refusing to fetch {_short(url)}: host {host!r} resolves to {ip}, a "
                "loopback, private, link-local or reserved address (the operator can allow "
                "it with --allowed-media-domains or --allow-private-media)"
            )


def _connect(
    policy: MediaPolicy,
    url: str,
    deadline: _Deadline,
    address: tuple[str, int],
    timeout: Any = None,
    source_address: Any = None,
    **_: Any,
) -> socket.socket:
    """http.client's ``_create_connection`` for every connection of a fetch.

    Resolves the host once, checks its addresses and connects to the address it checked, so a
    second DNS answer cannot swap it (DNS rebinding). urllib's per-operation ``timeout`` is
    ignored: the socket timeout is clamped to the deadline instead, and the watchdog gets the
    socket before it connects.
    """
    host, port = address
    infos = _resolve(host, port, deadline, url)
    _check_addresses(host, infos, url, policy)
    error: OSError | None = None
    for family, kind, proto, _name, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            deadline.watch(sock)
            sock.settimeout(deadline.remaining())
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            deadline.remaining()  # the watchdog may have fired before connect(), cutting nothing
            return sock
        except OSError as e:
            error = e
            sock.close()
    raise error or OSError(f"no address for {host!r}")


def _build_opener(
    policy: MediaPolicy, url: str, deadline: _Deadline
) -> urllib.request.OpenerDirector:
    """The one opener of a fetch: every connection (each redirect hop too) is made by
    :func:`_connect`, so the deadline and, under a guarding policy, the address check apply to
    all of them. A guarding opener ignores proxy environment variables (a proxy would connect on
    our behalf); a trusting one keeps urllib's proxy support."""

    def factory(cls: type[http.client.HTTPConnection], host: str, **kw: Any) -> Any:
        conn = cls(host, **kw)
        conn._create_connection = functools.partial(_connect, policy, url, deadline)  # type: ignore[attr-defined]
        return conn

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(functools.partial(factory, http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(
                functools.partial(factory, http.client.HTTPSConnection),
                req,
                context=self._context,  # type: ignore[attr-defined]
            )

    handlers: list[urllib.request.BaseHandler] = [
        Http(),
        Https(),
        _RedirectLimit(policy.max_redirects, url),
    ]
    if not policy.allow_private_networks:
        handlers.append(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener(*handlers)


def _without_userinfo(url: str) -> str:
    """``url`` with any user name and password masked, to quote it in an error safely."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return _short(parts._replace(netloc=f"***@{host}").geturl())


def _refuse_userinfo(url: str, redirected_from: str | None = None) -> None:
    """Refuse ``user[:password]@host`` URLs. urllib would take ``user@host`` for the host name,
    and ``http://trusted.com@10.0.0.1/`` reads as trusted.com while naming 10.0.0.1."""
    if "@" not in urllib.parse.urlsplit(url).netloc:
        return
    where = "" if redirected_from is None else f" ({_short(redirected_from)} redirects there)"
    raise MediaError(
        "URLs with a user name or password (user@host) are not supported: "
        f"{_without_userinfo(url)}{where}"
    )


class _RedirectLimit(urllib.request.HTTPRedirectHandler):
    """Counts hops itself (urllib never checks the first redirect), stays on http(s) and refuses
    user@host targets."""

    # urllib's own loop detection would otherwise fire before our count.
    max_repeats = max_redirections = 1_000_000

    def __init__(self, max_redirects: int, url: str) -> None:
        super().__init__()
        self._max_redirects = max_redirects
        self._url = url

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        hops = getattr(req, "_qwenvl_hops", 0) + 1
        try:
            self._check_hop(hops, newurl)
        except MediaError:
            fp.close()
            raise
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new._qwenvl_hops = hops  # type: ignore[attr-defined]
        return new

    def _check_hop(self, hops: int, newurl: str) -> None:
        # Plain MediaErrors (400-kind): a redirect loop is a bad URL, not a size limit.
        if hops > self._max_redirects:
            raise MediaError(
                f"too many redirects (the limit is {self._max_redirects}, "
                f"MediaPolicy.max_redirects) fetching {_short(self._url)}"
            )
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise MediaError(
                f"{_short(self._url)} redirects to a {scheme!r} URL; only http(s) is followed"
            )
        _refuse_userinfo(newurl, redirected_from=self._url)


def _check_fetchable(url: str, policy: MediaPolicy) -> None:
    """Refuse, before any lookup or connection, a URL that ``fetch_url`` must not fetch."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaError(f"unsupported URL scheme {scheme!r} for download: {_short(url)}")
    if not policy.allow_http:
        raise MediaError(f"http(s) URLs are disabled by the media policy: {_short(url)}")
    _refuse_userinfo(url)


def _download(
    opener: urllib.request.OpenerDirector,
    request: urllib.request.Request,
    url: str,
    policy: MediaPolicy,
) -> bytes:
    """Open ``request`` and read its body, refusing more than ``policy.max_bytes``."""
    with opener.open(request, timeout=policy.timeout_s) as response:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > policy.max_bytes:
            raise MediaTooLargeError(
                f"{_short(url)} is {int(length)} bytes, over the limit of "
                f"{policy.max_bytes} bytes (MediaPolicy.max_bytes)"
            )
        chunks: list[bytes] = []
        total = 0
        while chunk := response.read(min(_CHUNK, policy.max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > policy.max_bytes:
                raise MediaTooLargeError(
                    f"{_short(url)} sent more than {policy.max_bytes} bytes (MediaPolicy.max_bytes)"
                )
    return b"".join(chunks)


def _timed_out(url: str, policy: MediaPolicy) -> MediaTimeoutError:
    return MediaTimeoutError(f"timed out after {policy.timeout_s:g} s fetching {_short(url)}")


def _fetch_error(e: Exception, url: str, policy: MediaPolicy, deadline: _Deadline) -> MediaError:
    """The MediaError for a failed download. Any failure once the deadline has passed is a
    timeout: a socket the watchdog shut down fails in many ways (EOF, reset, TLS errors)."""
    if isinstance(e, urllib.error.HTTPError):
        e.close()
    if (
        deadline.expired
        or isinstance(e, TimeoutError)
        or isinstance(getattr(e, "reason", None), TimeoutError)
    ):
        return _timed_out(url, policy)
    if isinstance(e, urllib.error.HTTPError):
        return MediaError(f"HTTP {e.code} {e.reason} fetching {_short(url)}")
    if isinstance(e, urllib.error.URLError):
        return MediaError(f"cannot reach {_short(url)}: {e.reason}")
    return MediaError(f"error fetching {_short(url)}: {type(e).__name__}: {e}")


def fetch_url(url: str, policy: MediaPolicy = DEFAULT_POLICY) -> bytes:
    """Download an http(s) URL into memory under ``policy``'s limits.

    ``policy.timeout_s`` bounds the whole fetch (DNS, connect, headers, every redirect hop and
    the body) whatever the sender does, so a server dripping bytes cannot hold the thread.

    Raises:
        MediaTooLargeError: a body larger than ``policy.max_bytes``.
        MediaTimeoutError: the fetch did not finish within ``policy.timeout_s``.
        MediaError: scheme other than http(s), http disabled, a user name or password in the
            URL, unresolvable or unreachable host, a refused address, HTTP error status, or too
            many redirects.
    """
    _check_fetchable(url, policy)
    deadline = _Deadline(policy.timeout_s)
    opener = _build_opener(policy, url, deadline)
    request = urllib.request.Request(url, headers={"User-Agent": "qwenvl", "Accept": "*/*"})
    try:
        with deadline:
            data = _download(opener, request, url, policy)
    except MediaError:
        raise
    except (http.client.HTTPException, OSError, ValueError) as e:
        raise _fetch_error(e, url, policy, deadline) from e
    if deadline.expired:  # the watchdog may have cut the body short: that EOF was not its end
        raise _timed_out(url, policy)
    return data
