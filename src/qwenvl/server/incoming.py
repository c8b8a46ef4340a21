"""Reading an API request before anything else runs: the key, a bounded body, JSON, validation
and the model name. Each refusal is an `APIError` naming the problem."""

from __future__ import annotations

import asyncio
import hmac
from typing import TypeVar

from pydantic import ValidationError
from starlette.requests import Request

from qwenvl.server.errors import APIError
from qwenvl.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    parse_json_body,
    validation_error,
)
from qwenvl.server.settings import ServerSettings

RequestModel = TypeVar("RequestModel", ChatCompletionRequest, CompletionRequest)


def authorize(request: Request, settings: ServerSettings) -> None:
    """401 unless the request carries ``Authorization: Bearer <api_key>`` (when a key is set);
    the comparison takes the same time whatever the key."""
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), settings.api_key.encode()
    )
    if not ok:
        raise APIError(
            401,
            "missing or wrong API key (send 'Authorization: Bearer <key>')",
            type="authentication_error",
            code="invalid_api_key",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over ``limit`` bytes (from its
    Content-Length, or while it streams in) instead of after buffering all of it."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(
            413,
            f"the request body is {length} bytes, over the limit of {limit} bytes",
            code="request_too_large",
        )
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(
                413,
                f"the request body is over the limit of {limit} bytes",
                code="request_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, settings: ServerSettings) -> object:
    """The body, which must arrive whole within ``body_timeout_s`` (a client dripping it
    would otherwise hold the request open for as long as it likes)."""
    try:
        raw = await asyncio.wait_for(
            read_body(request, settings.max_body_bytes), settings.body_timeout_s
        )
    except asyncio.TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {settings.body_timeout_s:g} s",
            code="request_timeout",
        ) from None
    return parse_json_body(raw)


def check_model(name: str, settings: ServerSettings) -> None:
    """404 for any model but the one served."""
    if name != settings.served_model_name:
        raise APIError(
            404,
            f"the model {name!r} does not exist; this server serves {settings.served_model_name!r}",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )


async def parse_request(
    request: Request, settings: ServerSettings, model: type[RequestModel]
) -> RequestModel:
    """The request as ``model``: authorized first, so that nothing of an unauthorized body is
    read, then read, validated and checked for the served model's name."""
    authorize(request, settings)
    body = await read_json(request, settings)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from e
    check_model(req.model, settings)
    return req
