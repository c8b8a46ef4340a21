"""``POST /v1/completions``: a raw prompt (the caller's own template text), streamed or not."""

from __future__ import annotations

import functools
import time
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qwenvl.outputs import StreamEvent
from qwenvl.processing.prompt import PromptInputs
from qwenvl.sampling import SamplingParams
from qwenvl.server import inputs
from qwenvl.server.incoming import parse_request
from qwenvl.server.jobs import Job, collect, start_job
from qwenvl.server.protocol import CompletionRequest
from qwenvl.server.responses import completion_logprobs, head, usage
from qwenvl.server.state import ServerState, State
from qwenvl.server.streaming import stream_response

router = APIRouter()


@router.post("/v1/completions")
async def completions(request: Request, state: State) -> Response:
    """As chat, without media fetching: a raw prompt is the caller's own template text."""
    t0 = time.monotonic()
    req = await parse_request(request, state.settings, CompletionRequest)
    fn = inputs.completion_prepare_fn(state, req)

    async def prepare() -> tuple[PromptInputs, SamplingParams]:
        prompt = await inputs.prepare(state, fn)
        return prompt, inputs.sampling_params(req, prompt, state, req.max_tokens, req.logprobs)

    job = await start_job(state, request, t0, prepare)
    top = head(state, f"cmpl-{job.request_id}", "text_completion")
    if req.stream:
        chunk_of = functools.partial(_chunk, state, req)
        return await stream_response(job, top, chunk_of, req.stream_options)
    return await _full(job, req, top)


async def _full(job: Job, req: CompletionRequest, top: dict[str, Any]) -> Response:
    texts, ids, lps, reasons = await collect(job, req.n)
    choices = [
        {
            "index": i,
            "text": texts[i],
            "logprobs": _logprobs(job.state, req, ids[i], lps[i]),
            "finish_reason": reasons[i] or "stop",
        }
        for i in range(req.n)
    ]
    body = {**top, "choices": choices, "usage": usage(job.prompt, sum(len(x) for x in ids))}
    return JSONResponse(body)


def _chunk(state: ServerState, req: CompletionRequest, ev: StreamEvent) -> dict[str, Any]:
    choice = {
        "index": ev.index,
        "text": ev.text,
        "logprobs": _logprobs(state, req, ev.token_ids, ev.logprobs or []),
        "finish_reason": ev.finish_reason,
    }
    return {"choices": [choice]}


def _logprobs(
    state: ServerState, req: CompletionRequest, token_ids: list[int], lps: list[dict[int, float]]
) -> dict[str, Any] | None:
    if req.logprobs is None:
        return None
    return completion_logprobs(state, token_ids, lps, req.logprobs)
