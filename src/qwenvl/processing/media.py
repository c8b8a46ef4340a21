"""Reading images from any source (file, URL, data URI, base64, bytes) and decoding them safely.

Sources are untrusted (they arrive in chat requests and training data), so every path is bounded
by a `MediaPolicy`: a byte limit, a pixel limit checked from the header before any pixel is
decoded, and for URLs the limits of `qwenvl.processing.fetch`. Every failure becomes a
``MediaError`` whose message says what was being loaded and why it failed; a size limit raises
``MediaTooLargeError`` and a missed deadline ``MediaTimeoutError``, so callers decide by type.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
import stat
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from qwenvl.errors import MediaError, MediaTooLargeError
from qwenvl.processing.fetch import fetch_url
from qwenvl.processing.image import to_rgb
from qwenvl.processing.policy import DEFAULT_POLICY, MediaPolicy
from qwenvl.processing.policy import shorten as _short

logger = logging.getLogger(__name__)

ImageSource = Image.Image | bytes | bytearray | str | os.PathLike[str]

URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Plain strings up to this length that are not files are reported as "file not found" rather
# than as bad base64: a real base64 image is longer.
_PATHLIKE_MAX_CHARS = 1024


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
            # read(max_bytes + 1) would allocate that much first (tens of MB) for a file of a few
            # kB, which cost a picture's header read 4 times its time; read the stat() size
            data = f.read(st.st_size + 1)
            if len(data) > st.st_size:  # the file grew after stat(): read on, to the limit
                data += f.read(policy.max_bytes + 1 - len(data))
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
    policy.check_pixels(*image.size, f"{what}: image is", "; possible decompression bomb")


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
        if _png_without_exif(self.image):
            return width, height  # Pillow would decode the whole PNG to look for a late eXIf
        try:
            orientation = self.image.getexif().get(0x0112, 1)
        except Exception:  # unreadable EXIF is ignored when loading too
            orientation = 1
        return (height, width) if orientation in (5, 6, 7, 8) else (width, height)

    def load(self, policy: MediaPolicy) -> Image.Image:
        """Decode the pixels: EXIF orientation applied, RGB."""
        return _finish(self.image, self.what, policy, owned=self.owned)


def _png_without_exif(image: Image.Image) -> bool:
    """A PNG opened from memory whose chunks (walked, not decompressed) hold no eXIf."""
    fp = getattr(image, "fp", None)
    if image.format != "PNG" or "exif" in image.info or not isinstance(fp, io.BytesIO):
        return False
    with fp.getbuffer() as data:
        pos = 8  # after the signature: chunks of length (4), type (4), data, CRC (4)
        while pos + 8 <= len(data):
            kind = bytes(data[pos + 4 : pos + 8])
            if kind == b"eXIf":
                return False
            if kind == b"IEND":
                return True
            pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return True


# Chunks a PNG header may hold before IDAT for the direct read below, with the least length
# Pillow's handler needs (its handlers of these only store values, so they cannot fail then).
_PLAIN_PNG_CHUNKS = {b"PLTE": 0, b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9}


def _plain_png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG that Pillow would open, and whose size ``OpenedImage.size``
    would return unturned, read from its chunks without Pillow (a tenth of the time, which the
    training index pays per picture); None when unsure: any other chunk before IDAT, an eXIf
    anywhere, a bad checksum, an unknown mode, a size Pillow would warn about. Then the caller
    opens it with Pillow, which gives the same answer or the same error as before."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    if int.from_bytes(data[8:12], "big") != 13:
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if (data[24], data[25]) not in PngImagePlugin._MODES or data[27] or not (width and height):
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or width * height > limit:
        return None
    pos, seen_idat = 8, False
    while pos + 8 <= len(data):  # the walk _png_without_exif makes, checking what Pillow checks
        n, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        if kind == b"eXIf":
            return None
        if kind == b"IEND":
            break
        if not seen_idat:
            if kind == b"IDAT":
                seen_idat = True
            elif pos > 8 and _PLAIN_PNG_CHUNKS.get(kind, n + 1) > n:
                return None
            if kind != b"IDAT" and data[pos + 8 + n : pos + 12 + n] != zlib.crc32(
                data[pos + 4 : pos + 8 + n]
            ).to_bytes(4, "big"):
                return None
        pos += 12 + n
    return (width, height) if seen_idat else None


def image_size(source: ImageSource, policy: MediaPolicy = DEFAULT_POLICY) -> tuple[int, int]:
    """``open_image(source, policy).size``: the size the model sees, with the same checks and
    errors, but a local PNG file's chunks are read directly (see :func:`_plain_png_size`)."""
    text = source.strip() if isinstance(source, str) else ""
    if (
        not text
        or text[:5].lower() == "data:"
        or URL_SCHEME.match(text)
        or not policy.allow_local_files
        or not os.path.exists(source)  # type: ignore[arg-type]
    ):
        return open_image(source, policy).size
    what = f"image file {_short(source)}"  # type: ignore[arg-type]
    data = _read_file(Path(source), policy)  # type: ignore[arg-type]
    size = _plain_png_size(data)
    if size is None:
        return _decode(data, what, policy).size
    policy.check_pixels(*size, f"{what}: image is", "; possible decompression bomb")
    return size


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
            f"{what} is not an image in a format Pillow can read ({len(data)} bytes)"
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
    match = URL_SCHEME.match(text)
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
