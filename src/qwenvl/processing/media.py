"""The only I/O of the preprocessing package: fetch image bytes and decode them safely.

Sources are untrusted (they arrive in chat requests and training data), so every path is bounded:
a byte limit (checked while streaming), a pixel limit checked from the header before any pixel is
decoded, a deadline on each whole download and a redirect limit. Every failure becomes a
``MediaError`` whose message says what was being loaded and why it failed; a size limit raises
``MediaTooLargeError`` and a missed deadline ``MediaTimeoutError``, so callers decide by type.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import http.client
import io
import ipaddress
import logging
import os
import re
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image, ImageOps, UnidentifiedImageError

from qwenvl.errors import ConfigError, MediaError, MediaTimeoutError, MediaTooLargeError
from qwenvl.processing.image import to_rgb

logger = logging.getLogger(__name__)

ImageSource = Image.Image | bytes | bytearray | str | os.PathLike[str]

_MiB = 1024 * 1024
_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_CHUNK = 64 * 1024
# Plain strings up to this length that are not files are reported as "file not found" rather
# than as bad base64: a real base64 image is longer.
_PATHLIKE_MAX_CHARS = 1024


@dataclass(frozen=True)
class MediaPolicy:
    """Limits applied while loading media.

    ``max_image_pixels`` defaults to 64 Mpx (8192*8192, 192 MiB as decoded RGB). That is 5x the
    largest input Qwen2-VL keeps (12.8 Mpx, beyond which it downscales) and below Pillow's own
    ``Image.MAX_IMAGE_PIXELS`` warning threshold (~89.5 Mpx), so under the defaults our check,
    made from the header before decoding, is the one that decides.
    """

    timeout_s: float = 10.0  # each whole download: DNS, connect, every redirect hop, body
    max_bytes: int = 64 * _MiB  # encoded size: file, download, or decoded base64
    max_image_pixels: int = 8192 * 8192
    allow_http: bool = True
    allow_local_files: bool = True
    max_redirects: int = 5
    # URL safety. The library default trusts every address; a server must not (see
    # ``MediaPolicy.safe``): with ``allow_private_networks=False`` every hop of a download is
    # resolved once, each resolved address is checked (no loopback, private, link-local, CGNAT,
    # multicast or reserved ones, so no cloud metadata endpoint either), and the socket connects to
    # the checked address itself, so a second DNS answer cannot swap it (DNS rebinding).
    allow_private_networks: bool = True
    # Hosts (exact, or a parent domain: "example.com" covers "img.example.com") the operator
    # trusts: they may resolve to private addresses.
    allowed_domains: tuple[str, ...] = ()
    # When set, local files (paths and file:// URLs) are read only from under this folder
    # (symlinks resolved first).
    local_media_root: str | None = None

    @classmethod
    def safe(
        cls,
        *,
        local_media_root: str | os.PathLike[str] | None = None,
        allowed_domains: tuple[str, ...] = (),
        allow_private_networks: bool = False,
        **limits: Any,
    ) -> MediaPolicy:
        """The policy for untrusted requests (the server's): public http(s) only, no local files
        unless ``local_media_root`` names the folder they must come from."""
        return cls(
            allow_local_files=local_media_root is not None,
            local_media_root=None if local_media_root is None else str(local_media_root),
            allowed_domains=tuple(d.lower().strip(".") for d in allowed_domains),
            allow_private_networks=allow_private_networks,
            **limits,
        )

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"MediaPolicy.timeout_s must be > 0, got {self.timeout_s!r}")
        for name in ("max_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"MediaPolicy.{name} must be a positive int, got {value!r}")
        if not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise ConfigError(
                f"MediaPolicy.max_redirects must be a non-negative int, got {self.max_redirects!r}"
            )


DEFAULT_POLICY = MediaPolicy()


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


def _short(text: str, limit: int = 120) -> str:
    # Keep error messages readable when the source is a multi-megabyte base64 string.
    return text if len(text) <= limit else f"{text[:100]}...({len(text)} chars)"


# ---------------------------------------------------------------------------------------------
# Fetching bytes


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


def _resolve(host: str, port: int, deadline: _Deadline, url: str) -> list[Any]:
    """``getaddrinfo`` within the deadline.

    A lookup cannot be interrupted, so it runs in a helper thread that the fetch stops waiting
    for when the time is up (the resolver's own timeouts end that thread later).
    """
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


def check_local_path(path: Path, policy: MediaPolicy) -> Path:
    """``path`` with symlinks resolved, if the policy lets local files be read from there."""
    if not policy.allow_local_files:
        raise MediaError(f"local files are disabled by the media policy: {_short(str(path))}")
    if policy.local_media_root is None:
        return path
    root = Path(policy.local_media_root).resolve()
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(root):
        raise MediaError(
            f"{_short(str(path))} is outside the allowed local media path {str(root)!r}"
        )
    return real


def _read_file(path: Path, policy: MediaPolicy) -> bytes:
    path = check_local_path(path, policy)
    try:
        st = path.stat()
    except FileNotFoundError as e:
        raise MediaError(f"image file not found: {_short(str(path))}") from e
    except (OSError, ValueError) as e:
        raise MediaError(f"cannot access image file {_short(str(path))}: {e}") from e
    if stat.S_ISDIR(st.st_mode):
        raise MediaError(f"{_short(str(path))} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise MediaError(f"{_short(str(path))} is not a regular file")
    if st.st_size > policy.max_bytes:
        raise MediaTooLargeError(
            f"image file {_short(str(path))} is {st.st_size} bytes, over the limit of "
            f"{policy.max_bytes} bytes (MediaPolicy.max_bytes)"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as e:
        raise MediaError(f"cannot read image file {_short(str(path))}: {e}") from e
    if len(data) > policy.max_bytes:  # the file grew after stat()
        raise MediaTooLargeError(f"image file {_short(str(path))} is over {policy.max_bytes} bytes")
    return data


def _file_url_to_path(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc in ("", "localhost"):
        return Path(urllib.request.url2pathname(parts.path))
    # qwen-vl-utils reads "file://dir/x.jpg" as the relative path "dir/x.jpg"; keep that working.
    return Path(urllib.request.url2pathname(parts.netloc + parts.path))


def _b64decode(text: str, policy: MediaPolicy) -> tuple[bytes | None, str]:
    """Strict base64 (standard or url-safe, padding optional) -> (bytes, "") or (None, why)."""
    compact = "".join(text.split())
    if len(compact) // 4 * 3 > policy.max_bytes:
        raise MediaTooLargeError(
            f"base64 data decodes to about {len(compact) // 4 * 3} bytes, over the limit of "
            f"{policy.max_bytes} bytes (MediaPolicy.max_bytes)"
        )
    if len(compact) % 4 == 1:
        return None, f"length {len(compact)} is not a valid base64 length"
    compact += "=" * (-len(compact) % 4)
    altchars = b"-_" if ("-" in compact or "_" in compact) else None
    try:
        return base64.b64decode(compact, altchars=altchars, validate=True), ""
    except (binascii.Error, ValueError) as e:
        return None, str(e)


def parse_data_uri(uri: str, policy: MediaPolicy, kind: str = "image") -> bytes:
    """The bytes of a ``data:`` URI whose media type is ``{kind}/*`` (or unspecified)."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise MediaError(f"malformed data URI (no ',' before the data): {_short(uri)}")
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    media_type = params[0]
    if media_type and not media_type.startswith(kind) and media_type != "application/octet-stream":
        raise MediaError(f"data URI has media type {media_type!r}, expected {kind}/*")
    if "base64" in params[1:]:
        data, why = _b64decode(payload, policy)
        if data is None:
            raise MediaError(f"data URI holds invalid base64 ({why}): {_short(uri)}")
        return data
    if len(payload) > 3 * policy.max_bytes:
        raise MediaTooLargeError(f"data URI is over the limit of {policy.max_bytes} bytes")
    return urllib.parse.unquote_to_bytes(payload)


# ---------------------------------------------------------------------------------------------
# Decoding


def _check_pixels(image: Image.Image, what: str, policy: MediaPolicy) -> None:
    width, height = image.size
    if width * height > policy.max_image_pixels:
        raise MediaTooLargeError(
            f"{what}: image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{policy.max_image_pixels} pixels (MediaPolicy.max_image_pixels; possible "
            "decompression bomb)"
        )


@dataclass
class OpenedImage:
    """An image whose header is read and whose pixels are not decoded yet."""

    image: Image.Image
    what: str
    owned: bool  # may be modified in place (we opened it ourselves)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as the model will see it, after EXIF orientation."""
        width, height = self.image.size
        try:
            orientation = self.image.getexif().get(0x0112, 1)
        except Exception:  # unreadable EXIF is ignored when loading too
            orientation = 1
        return (height, width) if orientation in (5, 6, 7, 8) else (width, height)

    def load(self, policy: MediaPolicy) -> Image.Image:
        """Decode the pixels: EXIF orientation applied, RGB."""
        return _finish(self.image, self.what, policy, owned=self.owned)


def _finish(image: Image.Image, what: str, policy: MediaPolicy, *, owned: bool) -> Image.Image:
    """Pixel-limit check, full decode, EXIF orientation, RGB. ``owned``: may modify ``image``."""
    _check_pixels(image, what, policy)  # header size only: nothing decoded yet
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaTooLargeError(f"{what}: image too large (decompression bomb check): {e}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error...
        raise MediaError(
            f"{what}: cannot decode image, the file is truncated or corrupt "
            f"({type(e).__name__}: {e})"
        ) from e
    _check_pixels(image, what, policy)  # a few formats only know their size after load()
    try:
        transposed = ImageOps.exif_transpose(image, in_place=owned)
        if transposed is not None:
            image = transposed
    except Exception as e:
        # A malformed EXIF block should not make an otherwise valid picture unusable.
        logger.warning("%s: ignoring unreadable EXIF orientation: %s", what, e)
    return to_rgb(image)


def _decode(data: bytes, what: str, policy: MediaPolicy) -> OpenedImage:
    if len(data) > policy.max_bytes:
        raise MediaTooLargeError(
            f"{what} is {len(data)} bytes, over the limit of {policy.max_bytes} bytes "
            "(MediaPolicy.max_bytes)"
        )
    if not data:
        raise MediaError(f"{what} is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise MediaError(
            f"{what} is not an image in a format Pillow can read ({len(data)} bytes, "
            f"starting {data[:12]!r})"
        ) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaTooLargeError(f"{what}: image too large (decompression bomb check): {e}") from e
    except Exception as e:
        raise MediaError(f"{what}: cannot open image ({type(e).__name__}: {e})") from e
    _check_pixels(image, what, policy)
    return OpenedImage(image, what, owned=True)


def _load_string(source: str, policy: MediaPolicy) -> OpenedImage:
    text = source.strip()
    if not text:
        raise MediaError("empty image source string")
    if text[:5].lower() == "data:":
        return _decode(parse_data_uri(text, policy), "data URI image", policy)
    match = _URL_SCHEME.match(text)
    if match:
        scheme = match.group(1).lower()
        if scheme in ("http", "https"):
            return _decode(fetch_url(text, policy), f"image at {_short(text)}", policy)
        if scheme == "file":
            path = _file_url_to_path(text)
            return _decode(_read_file(path, policy), f"image file {_short(str(path))}", policy)
        raise MediaError(
            f"unsupported URL scheme {scheme!r} in {_short(text)}; use http(s)://, file://, "
            "data:, a local path or base64"
        )
    if policy.allow_local_files and os.path.exists(source):
        return _decode(_read_file(Path(source), policy), f"image file {_short(source)}", policy)
    data, why = _b64decode(text, policy)
    if data is None:
        if len(text) > _PATHLIKE_MAX_CHARS:
            raise MediaError(f"invalid base64 image data ({why}): {_short(text)}")
        if not policy.allow_local_files:
            raise MediaError(
                f"{_short(text)!r} is not base64 image data, and local file paths are disabled "
                "by the media policy"
            )
        raise MediaError(
            f"image file not found: {_short(source)} (nor is it a URL or base64 image data)"
        )
    try:
        return _decode(data, "base64 image data", policy)
    except MediaError as e:
        # Over a limit, it was image data after all: keep that error, and its type.
        if len(text) > _PATHLIKE_MAX_CHARS or isinstance(e, MediaTooLargeError):
            raise
        raise MediaError(
            f"{_short(text)!r} is neither an existing image file nor base64 image data ({e})"
        ) from e


def load_image(source: ImageSource, policy: MediaPolicy = DEFAULT_POLICY) -> Image.Image:
    """Load an image from any supported source as a fully decoded RGB ``PIL.Image``.

    ``open_image(source, policy).load(policy)``: see :func:`open_image` for the header-only step.

    EXIF orientation is applied, then the image is converted to RGB exactly as the transformers
    processor does (transparency composited onto white). Truncated files are errors as long as
    Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its default (False).

    Args:
        source: a ``PIL.Image.Image``; encoded ``bytes``/``bytearray``; a ``pathlib.Path``; or a
            ``str`` holding a local path, a ``file://`` or ``http(s)://`` URL, a
            ``data:image/...;base64,...`` URI, or raw base64.
        policy: byte, pixel, network and source-kind limits.

    Raises:
        MediaError: for every failure (missing or unreadable file, unknown format, truncated data,
            invalid base64, byte or pixel limits, network errors, unsupported scheme or type).
    """
    return open_image(source, policy).load(policy)


def open_image(source: ImageSource, policy: MediaPolicy = DEFAULT_POLICY) -> OpenedImage:
    """Read an image's header only (size, orientation), checking the byte and pixel limits.

    Lets callers count an image's vision tokens, and refuse a request that cannot fit, before
    any pixel is decoded. Raises ``MediaError`` like :func:`load_image`.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source, "PIL image", policy)
        return OpenedImage(source, "PIL image", owned=False)
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source), "image bytes", policy)
    if isinstance(source, os.PathLike):
        path = Path(source)
        return _decode(_read_file(path, policy), f"image file {_short(str(path))}", policy)
    if isinstance(source, str):
        return _load_string(source, policy)
    raise MediaError(
        f"unsupported image source of type {type(source).__name__}; expected a PIL image, bytes, "
        "a path, a URL, a data URI or base64"
    )


def image_content_hash(image: Image.Image) -> str:
    """Hex sha256 of an image's mode, size and pixels (and palette), for content-keyed caches."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}\0{image.width}x{image.height}\0".encode())
    if image.mode in ("P", "PA"):
        digest.update(bytes(image.getpalette() or []))
    digest.update(image.tobytes())
    return digest.hexdigest()
