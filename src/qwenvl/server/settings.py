"""ServerSettings: everything ``qwenvl serve`` can be told, validated once at startup."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qwenvl.errors import ConfigError
from qwenvl.processing.policy import MediaPolicy

_MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Options of the OpenAI-compatible server.

    Args:
        served_model_name: the name clients pass as ``model`` (others get 404).
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>``.
        max_waiting_requests: requests received but not yet generating (preprocessing or queued);
            beyond it new ones get 429 with ``Retry-After``.
        max_body_bytes: largest request body (413 beyond).
        max_media_bytes: largest encoded image or video (download, data URI or file; 413 beyond).
        max_image_pixels: largest decoded image (header check before decoding; 413 beyond).
        media_timeout_s: per download.
        max_redirects: per download.
        allowed_local_media_path: ``file://`` URLs are served only from under this folder
            (none: no local files at all).
        allowed_media_domains: hosts trusted to resolve to private addresses.
        allow_private_media: trust every address (only for a server on a private network).
        default_max_tokens: ``max_tokens`` of a request that sets none and whose checkpoint
            sets none (None: the rest of the context, as vLLM).
        preprocess_workers: threads decoding images and videos off the event loop.
        retry_after_s: the ``Retry-After`` header of a 429/503.
        malloc_trim_interval_s: how often freed heap memory is returned to the OS (glibc
            ``malloc_trim``; 0 = never).
        fetch_workers: threads downloading media URLs, apart from ``preprocess_workers``, so
            slow senders (each cut off after ``media_timeout_s``) never hold up decoding.
        header_timeout_s: a connection must send a request's whole header within this time
            (slowloris guard), or it is closed.
        body_timeout_s: a request's whole body must arrive within this time (408 beyond).
        metrics_need_key: with an ``api_key``, ``/metrics`` needs it too (False: open, for a
            scraper on a trusted network).
        special_tokens_in_content: parse special-token strings typed in messages as control
            tokens (trusted clients only: anyone could then end their turn and write a system
            turn). Off: message text is always plain text.
        web: serve the chat page at ``/`` (``server/web/``); off: only the API.
    """

    served_model_name: str = "qwenvl"
    api_key: str | None = None
    max_waiting_requests: int = 64
    max_body_bytes: int = 64 * _MiB
    max_media_bytes: int = 32 * _MiB
    max_image_pixels: int = 8192 * 8192
    media_timeout_s: float = 10.0
    max_redirects: int = 5
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] = field(default_factory=tuple)
    allow_private_media: bool = False
    default_max_tokens: int | None = None
    preprocess_workers: int = 4
    retry_after_s: int = 1
    malloc_trim_interval_s: float = 5.0
    fetch_workers: int = 32
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    metrics_need_key: bool = True
    special_tokens_in_content: bool = False
    web: bool = True

    def __post_init__(self) -> None:
        counts = ("max_body_bytes", "max_media_bytes", "max_image_pixels", "preprocess_workers")
        for name in (*counts, "fetch_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("media_timeout_s", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_waiting_requests < 0:
            raise ConfigError("max_waiting_requests must be >= 0")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ConfigError("default_max_tokens must be positive")
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path)
            if not root.is_dir():
                raise ConfigError(f"--allowed-local-media-path {root} is not a folder")
        if not self.served_model_name:
            raise ConfigError("served_model_name must not be empty")

    def media_policy(self) -> MediaPolicy:
        """The safe policy every request's media is loaded under."""
        return MediaPolicy.safe(
            local_media_root=self.allowed_local_media_path,
            allowed_domains=self.allowed_media_domains,
            allow_private_networks=self.allow_private_media,
            timeout_s=self.media_timeout_s,
            max_bytes=self.max_media_bytes,
            max_image_pixels=self.max_image_pixels,
            max_redirects=self.max_redirects,
        )
