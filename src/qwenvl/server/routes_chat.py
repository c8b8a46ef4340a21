"""``POST /v1/chat/completions``: messages with images and videos, tools, logprobs, grounding;
streamed (SSE) or not."""

from __future__ import annotations

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
from qwenvl.server.protocol import ChatCompletionRequest
from qwenvl.server.responses import (
    grounding_of,
    head,
    logprobs_content,
    message_of,
    seen,
    tool_deltas,
    usage,
)
from qwenvl.server.state import State
from qwenvl.server.streaming import stream_response
from qwenvl.server.tool_parser import ToolCallStream

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat(request: Request, state: State) -> Response:
    """Everything that can be refused (the body, media URLs, the context budget) is refused
    before the request takes a waiting slot; media are fetched and decoded while it holds one."""
    t0 = time.monotonic()
    req = await parse_request(request, state.settings, ChatCompletionRequest)
    fn, messages = inputs.chat_prepare_fn(state, req)

    async def prepare() -> tuple[PromptInputs, SamplingParams]:
        await inputs.fetch_media(state, messages)
        prompt = await inputs.prepare(state, fn)
        top = req.top_logprobs or 0
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = inputs.sampling_params(
            req, prompt, state, max_tokens, top if req.logprobs else None
        )
        if req.qwenvl.grounding:  # a grounding_image the request lacks is a 400 now
            grounding_of("", prompt, req.qwenvl.grounding_image, state.llm.config.family)
        return prompt, params

    job = await start_job(state, request, t0, prepare)
    tools_on = inputs.tools_of(req) is not None
    if req.stream:
        return await _stream(job, req, tools_on)
    return await _full(job, req, tools_on)


async def _full(job: Job, req: ChatCompletionRequest, tools_on: bool) -> Response:
    state = job.state
    texts, ids, lps, reasons = await collect(job, req.n)
    choices = []
    extra = seen(job.prompt)
    grounding = []
    for i in range(req.n):
        message, called = message_of(texts[i], tools_on)
        choice: dict[str, Any] = {
            "index": i,
            "message": message,
            "logprobs": None,
            "finish_reason": "tool_calls" if called else (reasons[i] or "stop"),
        }
        if req.logprobs:
            content = logprobs_content(state, ids[i], lps[i], req.top_logprobs or 0)
            choice["logprobs"] = {"content": content}
        choices.append(choice)
        if req.qwenvl.grounding:
            objs = grounding_of(
                texts[i], job.prompt, req.qwenvl.grounding_image, state.llm.config.family
            )
            grounding.append({"index": i, "objects": objs})
    if req.qwenvl.grounding:
        extra["grounding"] = grounding
    body = {
        **head(state, f"chatcmpl-{job.request_id}", "chat.completion"),
        "choices": choices,
        "usage": usage(job.prompt, sum(len(x) for x in ids)),
        "qwenvl": extra,
    }
    return JSONResponse(body)


async def _stream(job: Job, req: ChatCompletionRequest, tools_on: bool) -> Response:
    roles = [
        {
            "index": i,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        for i in range(req.n)
    ]
    return await stream_response(
        job,
        head(job.state, f"chatcmpl-{job.request_id}", "chat.completion.chunk"),
        _ChatDeltas(job, req, tools_on),
        req.stream_options,
        opening=[{"choices": roles, "qwenvl": seen(job.prompt)}],
    )


class _ChatDeltas:
    """Turns each engine event into a chat chunk: content and tool-call deltas (parsed as they
    stream), logprobs, and at a choice's end its finish reason and grounding."""

    def __init__(self, job: Job, req: ChatCompletionRequest, tools_on: bool) -> None:
        self.job, self.req = job, req
        self.parsers = [ToolCallStream() for _ in range(req.n)] if tools_on else None
        self.texts = [""] * req.n  # each choice's text so far, for grounding at its end

    def __call__(self, ev: StreamEvent) -> dict[str, Any] | None:
        i, reason = ev.index, ev.finish_reason
        delta = self._delta(ev)
        if reason and self.parsers is not None and self.parsers[i].calls:
            reason = "tool_calls"
        logprobs = None
        if self.req.logprobs and ev.logprobs:
            top = self.req.top_logprobs or 0
            logprobs = {"content": logprobs_content(self.job.state, ev.token_ids, ev.logprobs, top)}
        self.texts[i] += ev.text
        if not delta and not reason and logprobs is None:
            return None
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        chunk: dict[str, Any] = {"choices": [choice]}
        if reason and self.req.qwenvl.grounding:
            objs = grounding_of(
                self.texts[i],
                self.job.prompt,
                self.req.qwenvl.grounding_image,
                self.job.state.llm.config.family,
            )
            chunk["qwenvl"] = {"grounding": [{"index": i, "objects": objs}]}
        return chunk

    def _delta(self, ev: StreamEvent) -> dict[str, Any]:
        """The new content and tool calls of ``ev`` (a finished choice flushes its parser)."""
        if self.parsers is None:
            return {"content": ev.text} if ev.text else {}
        parser = self.parsers[ev.index]
        text, calls = parser.feed(ev.text)
        if ev.finish_reason:
            more_text, more_calls = parser.finish()
            text, calls = text + more_text, calls + more_calls
        delta: dict[str, Any] = {}
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = tool_deltas(parser, calls)
        return delta
