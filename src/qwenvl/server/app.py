"""The FastAPI app: ``create_app(llm, settings)`` serves one ``LLM`` with the OpenAI API.

Routes: ``POST /v1/chat/completions`` (`routes_chat`), ``POST /v1/completions``
(`routes_completions`), ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus,
`routes_admin`), and the chat page at ``/`` (`routes_web`; off with ``settings.web=False``).
One engine thread serves every connection; each request streams through its own queue, and a
client that disconnects aborts its request at once. Every error is ``{"error": {message, type,
param, code}}`` (`errors`). The routes share one `ServerState`, kept on ``app.state.qwenvl``.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from qwenvl.llm import LLM
from qwenvl.server import (
    routes_admin,
    routes_chat,
    routes_completions,
    routes_responses,
    routes_web,
)
from qwenvl.server.errors import install_error_handlers
from qwenvl.server.metrics import Metrics
from qwenvl.server.settings import ServerSettings
from qwenvl.server.state import ServerState


def _load_malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


async def _trim_periodically(interval_s: float) -> None:
    """Hand freed heap pages back to the OS now and then. Decoding images of every size in
    several threads fragments glibc's arenas: without this RSS creeps up by the freed-but-kept
    pages (measured with bench/serve_load.py), although nothing is leaked."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_s)
        await loop.run_in_executor(None, _malloc_trim, 0)


class CountRequests:
    """Counts ``/v1/*`` responses by path and status (a plain ASGI middleware: streaming and
    disconnects pass through untouched, unlike ``BaseHTTPMiddleware``)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_request(path, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(llm: LLM, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving ``llm``. Its processor is switched to ``settings.media_policy()`` (public
    http(s) only, bounded downloads): requests are untrusted."""
    settings = settings or ServerSettings()
    llm.processor.media_policy = settings.media_policy()
    state = ServerState.create(llm, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        trimmer = None
        if settings.malloc_trim_interval_s > 0 and _malloc_trim is not None:
            trimmer = asyncio.create_task(_trim_periodically(settings.malloc_trim_interval_s))
        yield
        if trimmer is not None:
            trimmer.cancel()
        state.close()

    app = FastAPI(title="qwenvl", lifespan=lifespan)
    app.state.qwenvl = state
    install_error_handlers(app)
    app.add_middleware(CountRequests, metrics=state.metrics)
    for module in (routes_admin, routes_chat, routes_completions, routes_responses):
        app.include_router(module.router)
    if settings.web:
        routes_web.install(app)
    return app
