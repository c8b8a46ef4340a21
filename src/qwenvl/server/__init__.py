"""An OpenAI-compatible HTTP server for one ``LLM`` (``qwenvl serve``; needs the ``serve`` extra).

``create_app(llm, settings)`` builds the FastAPI app; ``serve(llm, settings, host, port)`` runs it
with uvicorn.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any

from qwenvl.server.settings import ServerSettings

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from qwenvl.llm import LLM


def create_app(llm: LLM, settings: ServerSettings | None = None) -> FastAPI:
    from qwenvl.server.app import create_app as _create

    return _create(llm, settings)


def uvicorn_config(app: FastAPI, settings: ServerSettings, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's config for ``app``: its HTTP protocol closes connections whose request headers
    do not arrive within ``settings.header_timeout_s`` (see `qwenvl.server.connection`)."""
    import uvicorn

    from qwenvl.server.connection import header_deadline_protocol

    return uvicorn.Config(app, http=header_deadline_protocol(settings.header_timeout_s), **kwargs)


def serve(llm: LLM, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``llm`` until interrupted, or until a tensor-parallel worker is lost (the engine
    can run no more steps: the server stops instead of answering 503 forever)."""
    import logging

    import uvicorn

    # the first request must not pay for building kernels or first-use paths
    seconds = llm.warm_up()
    logging.getLogger(__name__).info("warmed up in %.1f s", seconds)
    config = uvicorn_config(create_app(llm, settings), settings, host=host, port=port)
    server = uvicorn.Server(config)
    if llm.workers is not None:  # stop a moment later, so that requests in flight get the 503
        llm.workers.on_lost = lambda why: threading.Timer(
            LOST_GRACE_S, setattr, (server, "should_exit", True)
        ).start()
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal it stopped on: a stop asked for by Ctrl-C or SIGTERM
        # exits 0 through the callers' cleanup (the tensor-parallel workers are told to stop)
        # instead of dying on the spot (SIGTERM) or as an interruption (SIGINT)
        signal.signal(signal.SIGTERM, _exit_cleanly)
        signal.signal(signal.SIGINT, _exit_cleanly)
    server.run()


LOST_GRACE_S = 3.0  # after a tensor-parallel worker is lost, before the server stops


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


__all__ = ["ServerSettings", "create_app", "serve", "uvicorn_config"]
