"""The server's one error path: every failure becomes ``{"error": {message, type, param, code}}``.

`APIError` is what handlers raise; `input_error` and `engine_error` map qwenvl's own exceptions to
it (by type, never by wording); `install_error_handlers` turns it, Starlette's HTTP errors,
validation errors and anything unexpected into JSON responses. A client that went away
(`ClientGone`) gets the conventional 499. Streams that already started report errors as an SSE
event instead (see `qwenvl.server.streaming`), with the same body.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qwenvl.errors import (
    ContextLengthError,
    EngineDeadError,
    MediaError,
    MediaTimeoutError,
    MediaTooLargeError,
    QwenVLError,
)

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error that becomes ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body, the same in a response and in a stream's error event."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ClientGone(Exception):
    """The client closed the connection; its request is aborted."""


def input_error(e: QwenVLError) -> APIError:
    """The one mapping from qwenvl's input errors to HTTP: by type, never by wording.

    413 for media over a size limit, 400 with ``context_length_exceeded`` for prompts that
    cannot fit, 400 for everything else the input got wrong.
    """
    msg = str(e)
    if isinstance(e, MediaTooLargeError):
        return APIError(413, msg, code="media_too_large")
    if isinstance(e, ContextLengthError):
        return APIError(400, msg, param="messages", code="context_length_exceeded")
    if isinstance(e, MediaTimeoutError):
        return APIError(400, msg, code="media_timeout")
    if isinstance(e, MediaError):
        return APIError(400, msg, code="invalid_media")
    return APIError(400, msg, code="invalid_request")


def engine_error(e: BaseException) -> APIError:
    """A failure while generating: the input's fault (400/413), a closed engine (503, retry),
    or the server's (500)."""
    if isinstance(e, QwenVLError):
        return input_error(e)
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), type="server_error", code="engine_dead")
    if isinstance(e, RuntimeError) and "shut down" in str(e):
        return APIError(
            503, str(e), type="server_error", code="unavailable", headers={"Retry-After": "5"}
        )
    logger.error("generation failed: %s", e)
    return APIError(500, f"generation failed: {e}", type="server_error")


def error_response(e: APIError) -> JSONResponse:
    """The HTTP response of an error raised before a response started."""
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    # 404 for unknown routes, 405 for wrong methods: in OpenAI's shape too
    return error_response(
        APIError(e.status_code, str(e.detail), code=str(e.status_code), headers=e.headers)
    )


async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
    return error_response(APIError(400, str(e)))


async def _client_gone(request: Request, e: ClientGone) -> Response:
    return Response(status_code=499)


async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    logger.exception("unexpected error serving %s", request.url.path)
    return error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception a handler can raise through `error_response` (or 499)."""
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]
    app.add_exception_handler(ClientGone, _client_gone)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
