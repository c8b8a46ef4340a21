"""MediaPolicy: the limits every image and video is loaded under (bytes, pixels, time, where
from), and the checks that several loaders share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from qwenvl.errors import ConfigError, MediaTooLargeError

_MiB = 1024 * 1024


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

    def check_pixels(self, width: int, height: int, what: str, why: str = "") -> None:
        """Refuse a ``width`` x ``height`` picture over ``max_image_pixels``, before it is decoded
        or resized; ``what`` says what has that size, ``why`` what the caller can do."""
        area = width * height
        if area > self.max_image_pixels:
            raise MediaTooLargeError(
                f"{what} {width}x{height} = {area} pixels, over the limit of "
                f"{self.max_image_pixels} pixels (MediaPolicy.max_image_pixels{why})"
            )


DEFAULT_POLICY = MediaPolicy()


def shorten(text: str, limit: int = 120) -> str:
    """``text`` cut for an error message (a source may be a multi-megabyte base64 string)."""
    return text if len(text) <= limit else f"{text[:100]}...({len(text)} chars)"
