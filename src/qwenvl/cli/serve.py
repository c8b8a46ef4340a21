"""``qwenvl serve``: the OpenAI-compatible HTTP server (``pip install -e ".[serve]"``).

Registered in :data:`qwenvl.cli.main.SUBCOMMANDS` (``add_serve`` / ``cmd_serve``): arguments ->
``ServerSettings`` + ``EngineConfig`` -> :func:`qwenvl.server.serve`. Every option that sets a
field of one of them takes its default from that field.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from qwenvl.cli.common import (
    add_load_args,
    add_model_args,
    add_vision_args,
    default,
    resolve_device,
    torchrun_worker,
)
from qwenvl.engine.config import EngineConfig
from qwenvl.llm import LLM
from qwenvl.server.settings import ServerSettings

if TYPE_CHECKING:
    from qwenvl.cli.common import Subparsers


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a checkpoint with the OpenAI API (chat completions, SSE streaming)",
        description="Serve a checkpoint over HTTP with the OpenAI chat-completions API.",
    )
    add_model_args(p)
    add_load_args(p)
    add_vision_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=default(ServerSettings, "api_key"),
        help="require 'Authorization: Bearer KEY' on /v1/*",
    )
    p.add_argument("--served-model-name", help="the name clients pass as model (default: --model)")
    _add_engine_args(p)
    _add_size_args(p)
    _add_media_access_args(p)
    _add_request_args(p)
    p.set_defaults(func=cmd_serve)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """Options of :class:`EngineConfig`."""
    p.add_argument(
        "--max-model-len",
        type=int,
        default=default(EngineConfig, "max_model_len"),
        metavar="N",
        help="context limit in tokens",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=default(EngineConfig, "max_num_seqs"),
        metavar="N",
        help="most sequences generating at once (default %(default)s)",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=int,
        default=default(EngineConfig, "kv_cache_memory"),
        metavar="BYTES",
        help="KV cache size (default: measured)",
    )
    p.add_argument(
        "--encoder-cache-memory",
        type=int,
        default=default(EngineConfig, "encoder_cache_memory"),
        metavar="BYTES",
        help="vision embeddings kept across requests (0 disables; default %(default)s)",
    )


def _add_size_args(p: argparse.ArgumentParser) -> None:
    """Queue and size limits of :class:`ServerSettings`."""
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=default(ServerSettings, "max_waiting_requests"),
        metavar="N",
        help="requests waiting for their first token beyond which new ones get 429 "
        "(default %(default)s)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=default(ServerSettings, "max_body_bytes"),
        metavar="N",
        help="largest request body (default %(default)s)",
    )
    p.add_argument(
        "--max-media-bytes",
        type=int,
        default=default(ServerSettings, "max_media_bytes"),
        metavar="N",
        help="largest encoded image or video (default %(default)s)",
    )
    p.add_argument(
        "--media-timeout",
        type=float,
        default=default(ServerSettings, "media_timeout_s"),
        metavar="S",
        help="seconds per media download (default %(default)s)",
    )


def _add_media_access_args(p: argparse.ArgumentParser) -> None:
    """Where :class:`ServerSettings` lets media come from."""
    p.add_argument(
        "--allowed-local-media-path",
        default=default(ServerSettings, "allowed_local_media_path"),
        metavar="DIR",
        help="serve file:// media from under DIR (default: no local files)",
    )
    p.add_argument(
        "--allowed-media-domains",
        nargs="*",
        default=default(ServerSettings, "allowed_media_domains"),
        metavar="HOST",
        help="hosts trusted even when they resolve to private addresses",
    )
    p.add_argument(
        "--allow-private-media",
        action="store_true",
        default=default(ServerSettings, "allow_private_media"),
        help="allow media URLs on loopback/private/link-local addresses (trusted networks only)",
    )


def _add_request_args(p: argparse.ArgumentParser) -> None:
    """The rest of :class:`ServerSettings`: request defaults, workers, timeouts, trust."""
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=default(ServerSettings, "default_max_tokens"),
        metavar="N",
        help="max_tokens of a request that sets none (default: the checkpoint's, else the rest "
        "of the context)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=default(ServerSettings, "max_image_pixels"),
        metavar="N",
        help="largest image, as sent or as resized by its options (413 beyond; default "
        "%(default)s)",
    )
    p.add_argument(
        "--fetch-workers",
        type=int,
        default=default(ServerSettings, "fetch_workers"),
        metavar="N",
        help="threads downloading media URLs, apart from preprocessing (default %(default)s)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=default(ServerSettings, "header_timeout_s"),
        metavar="S",
        help="close connections whose request headers take longer (slowloris guard; default "
        "%(default)s)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=default(ServerSettings, "body_timeout_s"),
        metavar="S",
        help="408 for request bodies that take longer to arrive (default %(default)s)",
    )
    p.add_argument(
        "--metrics-without-key",
        dest="metrics_need_key",
        action="store_false",
        default=default(ServerSettings, "metrics_need_key"),
        help="serve /metrics without the API key (for a scraper on a trusted network)",
    )
    p.add_argument(
        "--special-tokens-in-content",
        action="store_true",
        default=default(ServerSettings, "special_tokens_in_content"),
        help="parse special tokens typed in messages as control tokens (trusted clients only: "
        "a user could end their turn and write a system turn)",
    )
    p.add_argument(
        "--no-web",
        dest="web",
        action="store_false",
        default=default(ServerSettings, "web"),
        help="do not serve the chat page at / (only the API)",
    )


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """The ``ServerSettings`` the serve arguments describe."""
    return ServerSettings(
        served_model_name=args.served_model_name or getattr(args, "model_name", None) or args.model,
        api_key=args.api_key,
        max_waiting_requests=args.max_waiting_requests,
        max_body_bytes=args.max_body_bytes,
        max_media_bytes=args.max_media_bytes,
        media_timeout_s=args.media_timeout,
        allowed_local_media_path=args.allowed_local_media_path,
        allowed_media_domains=tuple(args.allowed_media_domains),
        allow_private_media=args.allow_private_media,
        default_max_tokens=args.default_max_tokens,
        max_image_pixels=args.max_image_pixels,
        fetch_workers=args.fetch_workers,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        metrics_need_key=args.metrics_need_key,
        special_tokens_in_content=args.special_tokens_in_content,
        web=args.web,
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The ``EngineConfig`` the serve arguments describe."""
    return EngineConfig(
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        kv_cache_memory=args.kv_cache_memory,
        encoder_cache_memory=args.encoder_cache_memory,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from qwenvl.server import serve

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SystemExit(
            f'error: qwenvl serve needs the serve extra: pip install "qwenvl[serve]" ({e})'
        ) from None
    worker = torchrun_worker(args)
    if worker is not None:
        return worker
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = server_settings(args)
    llm = LLM(
        args.model,
        dtype=args.dtype,
        device=resolve_device(args.device),
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        media_policy=settings.media_policy(),
        quantization=args.quantization,
        pack_weights=args.pack_weights,
        head_quantization=args.head_quantization,
        engine_config=engine_config(args),
        tensor_parallel_size=args.tensor_parallel_size,
        prefill_dtype=args.prefill_dtype,
    )
    try:
        serve(llm, settings, host=args.host, port=args.port)
    finally:
        llm.shutdown()
    return 1 if llm.workers is not None and llm.workers.lost else 0
