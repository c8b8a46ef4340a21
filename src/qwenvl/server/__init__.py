"""An OpenAI-compatible HTTP server for one ``LLM`` (``qwenvl serve``; needs the ``serve`` extra).

``create_app(llm, settings)`` builds the FastAPI app; ``serve(llm, settings, host, port)`` runs it
with uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qwenvl.server.settings import ServerSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from qwenvl.llm import LLM


def create_app(llm: LLM, settings: ServerSettings | None = None) -> FastAPI:
    from qwenvl.server.app import create_app as _create

    return _create(llm, settings)


def serve(llm: LLM, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``llm`` until interrupted."""
    import uvicorn

    uvicorn.run(create_app(llm, settings), host=host, port=port, log_level="info")


__all__ = ["ServerSettings", "create_app", "serve"]
