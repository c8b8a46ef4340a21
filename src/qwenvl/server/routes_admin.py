"""The routes around generation: ``GET /health`` (for load balancers: no key), ``GET /v1/models``
and ``GET /metrics`` (Prometheus; behind the key unless ``metrics_need_key`` is off)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from qwenvl.server.errors import APIError
from qwenvl.server.incoming import authorize
from qwenvl.server.state import State

router = APIRouter()


@router.get("/health")
async def health(state: State) -> Response:
    """200 while the engine runs, 503 once it is shut down or a tensor-parallel worker is lost."""
    if state.engine._closed:
        raise APIError(503, "the engine is shut down", type="server_error")
    workers = state.llm.workers
    if workers is not None and workers.lost is not None:
        raise APIError(503, workers.error().args[0], type="server_error", code="engine_dead")
    return Response(status_code=200)


@router.get("/v1/models")
async def models(request: Request, state: State) -> dict[str, Any]:
    """The one served model, under the name clients must pass."""
    authorize(request, state.settings)
    llm = state.llm
    return {
        "object": "list",
        "data": [
            {
                "id": state.settings.served_model_name,
                "object": "model",
                "created": int(state.started),
                "owned_by": "qwenvl",
                "root": str(llm.path),
                "max_model_len": llm.engine.max_model_len,
            }
        ],
    }


@router.get("/metrics")
async def metrics(request: Request, state: State) -> PlainTextResponse:
    """The server's counters and the engine's stats, in Prometheus' text format."""
    if state.settings.metrics_need_key:
        authorize(request, state.settings)
    engine = state.llm.engine
    gauges = {
        "requests_waiting": state.waiting,
        "requests_unfinished": state.engine.num_unfinished,
        "engine_requests_in_engine": len(engine.requests),
    }
    text = state.metrics.render(gauges, dict(engine.stats))
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
