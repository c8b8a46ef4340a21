"""The FastAPI app: ``create_app(llm, settings)`` serves one ``LLM`` with the OpenAI API.

Routes: ``POST /v1/chat/completions`` (SSE streaming), ``POST /v1/completions``,
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). One engine thread serves every
connection; each request streams through its own queue, and a client that disconnects aborts its
request at once. Every error is ``{"error": {message, type, param, code}}``.
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from qwenvl.engine.async_engine import AsyncEngine
from qwenvl.llm import LLM
from qwenvl.outputs import StreamEvent
from qwenvl.server import serving as sv
from qwenvl.server.metrics import Metrics
from qwenvl.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_json_body,
    validation_error,
)
from qwenvl.server.settings import ServerSettings

logger = logging.getLogger(__name__)


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
    state = sv.ServerState(
        llm=llm,
        settings=settings,
        engine=AsyncEngine(llm.engine),
        pool=ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="qwenvl-media"),
        fetch_pool=ThreadPoolExecutor(settings.fetch_workers, thread_name_prefix="qwenvl-fetch"),
        metrics=Metrics(),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        trimmer = None
        if settings.malloc_trim_interval_s > 0 and _malloc_trim is not None:
            trimmer = asyncio.create_task(_trim_periodically(settings.malloc_trim_interval_s))
        yield
        if trimmer is not None:
            trimmer.cancel()
        state.engine.close()
        state.pool.shutdown(wait=False, cancel_futures=True)
        state.fetch_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="qwenvl", lifespan=lifespan)
    app.state.qwenvl = state

    # --- errors --------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        err = APIError(e.status_code, str(e.detail), code=str(e.status_code))
        return JSONResponse(err.body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        err = APIError(500, f"internal error: {type(e).__name__}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    app.add_middleware(CountRequests, metrics=state.metrics)

    # --- helpers -------------------------------------------------------------------------
    def authorize(request: Request) -> None:
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

    async def read_body(request: Request) -> bytes:
        limit = settings.max_body_bytes
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

    async def read_json(request: Request) -> Any:
        """The body, which must arrive whole within ``body_timeout_s`` (a client dripping it
        would otherwise hold the request open for as long as it likes)."""
        try:
            raw = await asyncio.wait_for(read_body(request), settings.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(
                408,
                f"the request body did not arrive within {settings.body_timeout_s:g} s",
                code="request_timeout",
            ) from None
        return parse_json_body(raw)

    def check_model(name: str) -> None:
        if name != settings.served_model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves "
                f"{settings.served_model_name!r}",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )

    async def parse(request: Request, model: type[Any]) -> Any:
        authorize(request)
        body = await read_json(request)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = model.model_validate(body)
        except ValidationError as e:
            raise validation_error(e) from e
        check_model(req.model)
        return req

    # --- routes --------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if state.engine._closed:
            raise APIError(503, "the engine is shut down", type="server_error")
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": settings.served_model_name,
                    "object": "model",
                    "created": int(started),
                    "owned_by": "qwenvl",
                    "root": str(llm.path),
                    "max_model_len": llm.engine.max_model_len,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        if settings.metrics_need_key:
            authorize(request)
        gauges = {
            "requests_waiting": state.waiting,
            "requests_unfinished": state.engine.num_unfinished,
            "engine_requests_in_engine": len(llm.engine.requests),
        }
        text = state.metrics.render(gauges, dict(llm.engine.stats))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        t0 = time.monotonic()
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        fn, prefix, messages = sv.chat_prepare_fn(state, req)
        slot = state.admit()
        try:
            await sv.fetch_media(state, messages)
            prompt = await sv.prepare(state, fn)
            top = req.top_logprobs or 0
            max_tokens = req.max_completion_tokens or req.max_tokens
            params = sv.sampling_params(
                req, prompt, state, max_tokens, top if req.logprobs else None
            )
            if req.qwenvl.grounding:
                sv.grounding_of("", prompt, req.qwenvl.grounding_image, llm.config.family)
        except BaseException:
            slot.release()
            raise
        job = sv.Job(state, request, prompt, params, slot, t0)
        tools_on = sv.tools_of(req) is not None
        if req.stream:
            return await stream_chat(job, req, prefix, tools_on)
        return await full_chat(job, req, prefix, tools_on)

    async def full_chat(
        job: sv.Job, req: ChatCompletionRequest, prefix: str, tools_on: bool
    ) -> Response:
        try:
            texts, ids, lps, reasons = await sv.collect(job, req.n)
        except sv.ClientGone:
            return Response(status_code=499)
        state.metrics.e2e.observe(time.monotonic() - job.started)
        choices = []
        extra = sv.seen(job.prompt)
        grounding = []
        for i in range(req.n):
            message, called = sv.message_of(texts[i], prefix, tools_on)
            choice: dict[str, Any] = {
                "index": i,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if called else (reasons[i] or "stop"),
            }
            if req.logprobs:
                content = sv.logprobs_content(state, ids[i], lps[i], req.top_logprobs or 0)
                choice["logprobs"] = {"content": content}
            choices.append(choice)
            if req.qwenvl.grounding:
                objs = sv.grounding_of(
                    texts[i], job.prompt, req.qwenvl.grounding_image, llm.config.family
                )
                grounding.append({"index": i, "objects": objs})
        if req.qwenvl.grounding:
            extra["grounding"] = grounding
        body = {
            "id": f"chatcmpl-{job.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": settings.served_model_name,
            "choices": choices,
            "usage": sv.usage(job.prompt, sum(len(x) for x in ids)),
            "qwenvl": extra,
        }
        return JSONResponse(body)

    async def stream_chat(
        job: sv.Job, req: ChatCompletionRequest, prefix: str, tools_on: bool
    ) -> Response:
        events = job.events()
        # The first event decides the status: admission errors are still real HTTP errors.
        try:
            first = await anext(events, None)
        except sv.ClientGone:
            return Response(status_code=499)
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        head = {
            "id": f"chatcmpl-{job.request_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": settings.served_model_name,
        }
        parsers = sv.new_tool_streams(req.n, prefix) if tools_on else None
        generated = [0] * req.n

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            body = {**head, "choices": choices, **extra}
            if include_usage:
                body.setdefault(
                    "usage", sv.usage(job.prompt, sum(generated)) if continuous else None
                )
            return sv.sse(body)

        def on_event(ev: StreamEvent) -> bytes | None:
            i = ev.index
            generated[i] += len(ev.token_ids)
            delta: dict[str, Any] = {}
            reason = ev.finish_reason
            if parsers is None:
                text, calls = ev.text, []
            else:
                text, calls = parsers[i].feed(ev.text)
                if reason:
                    more_text, more_calls = parsers[i].finish()
                    text, calls = text + more_text, calls + more_calls
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = sv.tool_deltas(parsers[i], calls)  # type: ignore[index]
            if reason and parsers is not None and parsers[i].calls:
                reason = "tool_calls"
            logprobs = None
            if req.logprobs and ev.logprobs:
                content = sv.logprobs_content(
                    state, ev.token_ids, ev.logprobs, req.top_logprobs or 0
                )
                logprobs = {"content": content}
            if not delta and not reason and logprobs is None:
                return None
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            extra: dict[str, Any] = {}
            if reason and req.qwenvl.grounding:
                objs = sv.grounding_of(
                    texts[i] + ev.text, job.prompt, req.qwenvl.grounding_image, llm.config.family
                )
                extra["qwenvl"] = {"grounding": [{"index": i, "objects": objs}]}
            texts[i] += ev.text
            return chunk([choice], **extra)

        texts = [""] * req.n

        async def body() -> AsyncIterator[bytes]:
            try:
                roles = [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(req.n)
                ]
                yield chunk(roles, qwenvl=sv.seen(job.prompt))
                if first is not None:
                    out = on_event(first)
                    if out:
                        yield out
                    async for ev in events:
                        out = on_event(ev)
                        if out:
                            yield out
                state.metrics.e2e.observe(time.monotonic() - job.started)
                if include_usage:
                    yield sv.sse(
                        {**head, "choices": [], "usage": sv.usage(job.prompt, sum(generated))}
                    )
            except sv.ClientGone:
                return
            except APIError as e:
                yield sv.sse(e.body())
            finally:
                await events.aclose()
            yield sv.sse("[DONE]")

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        t0 = time.monotonic()
        req: CompletionRequest = await parse(request, CompletionRequest)
        fn = sv.completion_prepare_fn(state, req)
        slot = state.admit()
        try:
            prompt = await sv.prepare(state, fn)
            params = sv.sampling_params(req, prompt, state, req.max_tokens, req.logprobs)
        except BaseException:
            slot.release()
            raise
        job = sv.Job(state, request, prompt, params, slot, t0)
        head = {
            "id": f"cmpl-{job.request_id}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": settings.served_model_name,
        }

        def logprobs_of(token_ids: list[int], lps: list[dict[int, float]]) -> dict[str, Any]:
            content = sv.logprobs_content(state, token_ids, lps, req.logprobs or 0)
            offsets, pos = [], 0
            for c in content:
                offsets.append(pos)
                pos += len(c["token"])
            return {
                "tokens": [c["token"] for c in content],
                "token_logprobs": [c["logprob"] for c in content],
                "top_logprobs": [
                    {t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content
                ],
                "text_offset": offsets,
            }

        if req.stream:
            events = job.events()
            try:
                first = await anext(events, None)
            except sv.ClientGone:
                return Response(status_code=499)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            generated = [0]

            def piece(ev: StreamEvent) -> bytes:
                generated[0] += len(ev.token_ids)
                lp = (
                    logprobs_of(ev.token_ids, ev.logprobs or [])
                    if req.logprobs is not None
                    else None
                )
                choice = {
                    "index": ev.index,
                    "text": ev.text,
                    "logprobs": lp,
                    "finish_reason": ev.finish_reason,
                }
                body = {**head, "choices": [choice]}
                if include_usage:
                    body["usage"] = None
                return sv.sse(body)

            async def body() -> AsyncIterator[bytes]:
                try:
                    if first is not None:
                        yield piece(first)
                        async for ev in events:
                            yield piece(ev)
                    if include_usage:
                        yield sv.sse(
                            {**head, "choices": [], "usage": sv.usage(job.prompt, generated[0])}
                        )
                except sv.ClientGone:
                    return
                except APIError as e:
                    yield sv.sse(e.body())
                finally:
                    await events.aclose()
                yield sv.sse("[DONE]")

            return StreamingResponse(body(), media_type="text/event-stream")

        try:
            texts, ids, lps, reasons = await sv.collect(job, req.n)
        except sv.ClientGone:
            return Response(status_code=499)
        choices = [
            {
                "index": i,
                "text": texts[i],
                "logprobs": logprobs_of(ids[i], lps[i]) if req.logprobs is not None else None,
                "finish_reason": reasons[i] or "stop",
            }
            for i in range(req.n)
        ]
        body = {**head, "choices": choices, "usage": sv.usage(prompt, sum(len(x) for x in ids))}
        return JSONResponse(body)

    started = time.time()
    _ = uuid  # ids come from serving.Job
    return app
