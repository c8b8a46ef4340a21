"""``POST /v1/responses``: OpenAI's Responses API, stateless, on the chat pipeline.

A Responses request is rewritten as the chat request it means (``instructions`` a system
message, ``input_text``/``input_image`` parts, ``function_call`` items an assistant turn's tool
calls, ``function_call_output`` items tool results, ``text.format`` the ``response_format``), so
validation, media, sampling, structured outputs and tools are the chat endpoint's. The reply comes
back as ``output`` items: a ``message`` with ``output_text`` and a ``function_call`` per call,
streamed as the Responses events (``response.created``, ``response.output_text.delta``, ...,
``response.completed``). ``previous_response_id`` needs a stored conversation, which a stateless
server does not keep: it is a 400 that says to send the whole conversation.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from pydantic import AliasChoices, Field, PositiveInt, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from qwenvl.server import inputs
from qwenvl.server.errors import APIError, ClientGone
from qwenvl.server.incoming import parse_request
from qwenvl.server.jobs import Job, collect, start_job
from qwenvl.server.protocol import ChatCompletionRequest, _Strict, validation_error
from qwenvl.server.state import State
from qwenvl.server.tool_parser import ToolCallStream
from qwenvl.tool_calls import ToolCall, extract_tool_calls

router = APIRouter()


class InputText(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None  # on an output_text part sent back: ignored


class InputImage(_Strict):
    type: Literal["input_image"]
    image_url: str
    detail: Literal["auto", "low", "high"] | None = None


class InputMessage(_Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[Annotated[InputText | InputImage, Field(discriminator="type")]]
    id: str | None = None
    status: str | None = None


class _CallItem(_Strict):
    """What both function-call items carry; ``id``, ``status`` and what else the openai SDK
    writes when a response's own output item is sent back (``async_``, ``caller``,
    ``namespace``) are accepted and ignored."""

    call_id: str
    id: str | None = None
    status: str | None = None
    async_: Any = Field(default=None, validation_alias=AliasChoices("async_", "async"))
    caller: Any = None
    namespace: Any = None


class FunctionCallItem(_CallItem):
    type: Literal["function_call"]
    name: str
    arguments: str


class FunctionCallOutput(_CallItem):
    type: Literal["function_call_output"]
    output: str


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextOptions(_Strict):
    format: TextFormat | None = None


class ResponsesRequest(_Strict):
    model: str
    input: str | list[InputMessage | FunctionCallItem | FunctionCallOutput]
    instructions: str | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    stream: bool = False
    previous_response_id: str | None = None
    store: bool | None = None  # nothing is stored either way
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request a Responses request means."""
    if req.previous_response_id is not None:
        raise APIError(
            400,
            "previous_response_id is not supported: this server keeps no conversations; send "
            "the whole conversation in input",
            param="previous_response_id",
        )
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for item in items:
        if isinstance(item, dict):
            messages.append(item)
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function"}
            call["function"] = {"name": item.name, "arguments": item.arguments}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutput):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            messages.append({"role": item.role, "content": _content(item.content)})
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    same = ("temperature", "top_p", "parallel_tool_calls", "user")
    for ours, theirs in (("max_output_tokens", "max_tokens"), *((k, k) for k in same)):
        value = getattr(req, ours)
        if value is not None:
            body[theirs] = value
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in req.tools
        ]
    if req.tool_choice is not None:
        choice = req.tool_choice
        if isinstance(choice, dict):  # {"type": "function", "name": ...}
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        body["tool_choice"] = choice
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type != "text":
        rf: dict[str, Any] = {"type": fmt.type}
        if fmt.type == "json_schema":
            rf["json_schema"] = {"name": fmt.name or "output", "schema": fmt.schema_ or {}}
        body["response_format"] = rf
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from e


def _content(content: str | list[InputText | InputImage]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for p in content:
        if isinstance(p, InputText):
            parts.append({"type": "text", "text": p.text})
        else:
            url: dict[str, Any] = {"url": p.image_url}
            if p.detail:
                url["detail"] = p.detail
            parts.append({"type": "image_url", "image_url": url})
    return parts


@router.post("/v1/responses")
async def responses(request: Request, state: State) -> Response:
    t0 = time.monotonic()
    req = await parse_request(request, state.settings, ResponsesRequest)
    chat = chat_request(req)
    fn, messages = inputs.chat_prepare_fn(state, chat)

    async def prepare() -> Any:
        await inputs.fetch_media(state, messages)
        prompt = await inputs.prepare(state, fn)
        return prompt, inputs.sampling_params(chat, prompt, state, chat.max_tokens, None)

    job = await start_job(state, request, t0, prepare)
    shell = _Shell(req, job, tools_on=inputs.tools_of(chat) is not None)
    if req.stream:
        return StreamingResponse(
            shell.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    texts, ids, _, reasons = await collect(job, 1)
    return JSONResponse(shell.final(texts[0], len(ids[0]), reasons[0]))


class _Shell:
    """The response object around one generated reply, whole or as events."""

    def __init__(self, req: ResponsesRequest, job: Job, tools_on: bool) -> None:
        self.req, self.job, self.tools_on = req, job, tools_on
        self.id = f"resp_{job.request_id}"
        self.msg_id = f"msg_{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.seq = 0
        self._where = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}

    def body(self, status: str, output: list[dict[str, Any]], generated: int = 0) -> dict:
        req, prompt = self.req, self.job.prompt
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.job.state.settings.served_model_name,
            "output": output,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "tools": [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools or []],
            "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "text": {"format": {"type": "text"}}
            if req.text is None
            else req.text.model_dump(exclude_none=True, by_alias=True),
            "previous_response_id": None,
            "store": False,
            "truncation": "disabled",
            "metadata": req.metadata or {},
            "user": req.user,
            "error": None,
            "incomplete_details": None,
            "reasoning": None,
            "usage": {
                "input_tokens": len(prompt.token_ids),
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": generated,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": len(prompt.token_ids) + generated,
            },
        }

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = (
            [{"type": "output_text", "text": text, "annotations": []}]
            if status == "completed"
            else []
        )
        return {
            "type": "message",
            "id": self.msg_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def call(tc: ToolCall) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": f"fc_{tc.id.removeprefix('call_')}",
            "call_id": tc.id,
            "name": tc.name,
            "arguments": json.dumps(tc.arguments, ensure_ascii=False),
            "status": "completed",
        }

    def final(self, text: str, generated: int, reason: str | None) -> dict[str, Any]:
        calls: list[ToolCall] = []
        if self.tools_on:
            text, calls = extract_tool_calls(text)
        output = ([self.message(text)] if text or not calls else []) + [self.call(c) for c in calls]
        out = self.body("completed", output, generated)
        if reason == "length":
            out["status"] = "incomplete"
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        return out

    def event(self, kind: str, **fields: Any) -> bytes:
        self.seq += 1
        data = json.dumps({"type": kind, "sequence_number": self.seq, **fields}, ensure_ascii=False)
        return f"event: {kind}\ndata: {data}\n\n".encode()

    def _open_message(self) -> Iterator[bytes]:
        yield self.event(
            "response.output_item.added", output_index=0, item=self.message("", "in_progress")
        )
        part = {"type": "output_text", "text": "", "annotations": []}
        yield self.event("response.content_part.added", **self._where, part=part)

    async def events(self) -> AsyncIterator[bytes]:
        """The Responses events: the text streams as it comes (a tool call's text is held back
        by the parser and sent as a function_call item)."""
        parser = ToolCallStream() if self.tools_on else None
        text, generated, reason, opened = "", 0, None, False
        yield self.event("response.created", response=self.body("in_progress", []))
        yield self.event("response.in_progress", response=self.body("in_progress", []))
        try:
            async for ev in self.job.events():
                generated += len(ev.token_ids)
                reason = ev.finish_reason or reason
                delta = ev.text if parser is None else parser.feed(ev.text)[0]
                if delta:
                    if not opened:
                        opened = True
                        for frame in self._open_message():
                            yield frame
                    text += delta
                    yield self.event("response.output_text.delta", **self._where, delta=delta)
        except ClientGone:
            return
        except APIError as e:
            yield self.event("error", message=e.message, code=e.code)
            return
        calls: list[ToolCall] = []
        if parser is not None:
            text += parser.finish()[0]
            calls = list(parser.calls)
        for frame in self._closing(opened, text, calls, generated, reason):
            yield frame

    def _closing(
        self, opened: bool, text: str, calls: list[ToolCall], generated: int, reason: str | None
    ) -> Iterator[bytes]:
        """The done events of the message (if any) and of each call, then the response's."""
        output: list[dict[str, Any]] = []
        if opened or not calls:
            if not opened:
                yield from self._open_message()
            part = {"type": "output_text", "text": text, "annotations": []}
            yield self.event("response.output_text.done", **self._where, text=text)
            yield self.event("response.content_part.done", **self._where, part=part)
            yield self.event("response.output_item.done", output_index=0, item=self.message(text))
            output.append(self.message(text))
        for tc in calls:
            item = self.call(tc)
            at = {"item_id": item["id"], "output_index": len(output)}
            pending = {**item, "arguments": "", "status": "in_progress"}
            yield self.event("response.output_item.added", output_index=len(output), item=pending)
            yield self.event(
                "response.function_call_arguments.delta", **at, delta=item["arguments"]
            )
            yield self.event(
                "response.function_call_arguments.done", **at, arguments=item["arguments"]
            )
            yield self.event("response.output_item.done", output_index=len(output), item=item)
            output.append(item)
        final = self.body("completed", output, generated)
        if reason == "length":
            final["status"], final["incomplete_details"] = (
                "incomplete",
                {"reason": "max_output_tokens"},
            )
            yield self.event("response.incomplete", response=final)
        else:
            yield self.event("response.completed", response=final)
