"""From a validated OpenAI request to engine inputs, and from engine events to OpenAI responses.

Nothing here blocks the event loop: media are loaded and preprocessed in a thread pool, and the
engine steps in its own thread (:class:`~qwenvl.engine.async_engine.AsyncEngine`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from starlette.requests import Request

from qwenvl.engine.async_engine import AsyncEngine
from qwenvl.errors import (
    ContextLengthError,
    MediaError,
    MediaTimeoutError,
    MediaTooLargeError,
    PromptError,
    QwenVLError,
)
from qwenvl.grounding import ground
from qwenvl.llm import LLM
from qwenvl.outputs import StreamEvent
from qwenvl.processing.fetch import fetch_url
from qwenvl.processing.media import check_local_path
from qwenvl.processing.policy import MediaPolicy
from qwenvl.processing.prompt import PromptInputs
from qwenvl.sampling import SamplingParams
from qwenvl.server.metrics import Metrics
from qwenvl.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ImagePart,
    NamedToolChoice,
    VideoPart,
)
from qwenvl.server.settings import ServerSettings
from qwenvl.server.tool_parser import ToolCallStream
from qwenvl.tool_calls import TOOL_CALL_START, extract_tool_calls

logger = logging.getLogger(__name__)


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


def _scheme(url: str) -> str:
    return urllib.parse.urlsplit(url.strip()).scheme.lower() if "://" in url else ""


def check_media_url(url: str, where: str, policy: MediaPolicy) -> None:
    """Only http(s), data: and (under the allowed folder) file: URLs reach the loaders."""
    scheme = _scheme(url)
    if url.strip()[:5].lower() == "data:":
        return
    if scheme in ("http", "https"):
        return
    if scheme == "file":
        from qwenvl.processing.media import _file_url_to_path

        try:
            check_local_path(_file_url_to_path(url.strip()), policy)
        except MediaError as e:
            raise APIError(400, f"{where}: {e}", param=where, code="invalid_media") from e
        return
    raise APIError(
        400,
        f"{where}: unsupported media URL {url[:80]!r}; use http(s)://, a data: URI, or file:// "
        "under the server's --allowed-local-media-path",
        param=where,
        code="invalid_media",
    )


@dataclass
class Waiting:
    """A slot among the server's waiting requests, given back once (first token or failure)."""

    state: ServerState
    held: bool = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.waiting -= 1


@dataclass
class ServerState:
    llm: LLM
    settings: ServerSettings
    engine: AsyncEngine
    pool: ThreadPoolExecutor  # preprocessing: tokenizing, decoding, resizing
    fetch_pool: ThreadPoolExecutor  # downloads only, each bounded by the media deadline
    metrics: Metrics = field(default_factory=Metrics)
    waiting: int = 0

    def admit(self) -> Waiting:
        if self.waiting >= self.settings.max_waiting_requests:
            raise APIError(
                429,
                f"the server has {self.waiting} requests waiting (the limit is "
                f"{self.settings.max_waiting_requests}); retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        self.waiting += 1
        return Waiting(self)


# --- prompt building -------------------------------------------------------------------------
def _forced_prefix(req: ChatCompletionRequest) -> str:
    """Text the reply is made to start with so that a call is made (tool_choice named or
    "required"); without guided decoding this is how the choice is honoured."""
    if isinstance(req.tool_choice, NamedToolChoice):
        name = json.dumps(req.tool_choice.function.name, ensure_ascii=False)
        return f'{TOOL_CALL_START}\n{{"name": {name}, "arguments": '
    if req.tool_choice == "required":
        return f'{TOOL_CALL_START}\n{{"name": "'
    return ""


def _extend(prompt: PromptInputs, llm: LLM, text: str) -> PromptInputs:
    """``prompt`` with plain text appended (positions continue after the last token)."""
    ids = llm.tokenizer.encode(text, special=False)  # holds a tool name from the request
    assert prompt.positions is not None
    start = prompt.positions[:, -1:] + 1  # [3, 1]
    extra = start + torch.arange(len(ids), dtype=prompt.positions.dtype)  # [3, k]
    return PromptInputs(
        prompt.token_ids + ids,
        prompt.images,
        prompt.videos,
        torch.cat([prompt.positions, extra], dim=1),
        prompt.rope_delta,
        (prompt.text or "") + text,
    )


def chat_messages(req: ChatCompletionRequest, policy: MediaPolicy) -> list[dict[str, Any]]:
    messages = []
    for mi, m in enumerate(req.messages):
        if isinstance(m.content, list):
            for ci, part in enumerate(m.content):
                if isinstance(part, (ImagePart, VideoPart)):
                    inner = part.image_url if isinstance(part, ImagePart) else part.video_url
                    url = inner if isinstance(inner, str) else inner.url
                    check_media_url(url, f"messages[{mi}].content[{ci}]", policy)
        messages.append(m.to_dict())
    return messages


def tools_of(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    if not req.tools or req.tool_choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if isinstance(req.tool_choice, NamedToolChoice):
        tools = [t for t in tools if t["function"]["name"] == req.tool_choice.function.name]
    return tools


# --- sampling --------------------------------------------------------------------------------
def sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    prompt: PromptInputs,
    state: ServerState,
    max_tokens: int | None,
    logprobs: int | None,
) -> SamplingParams:
    """The request's explicit fields over the checkpoint defaults; ``max_tokens`` checked
    against the context up front, with the numbers."""
    llm, engine = state.llm, state.llm.engine
    n_prompt = len(prompt.token_ids)
    limit = min(engine.max_model_len, engine.kv_capacity_tokens)
    room = limit - n_prompt
    vision = sum(im.num_tokens for im in prompt.images) + sum(v.num_tokens for v in prompt.videos)
    what = f"the prompt has {n_prompt} tokens ({vision} of them image/video tokens)"
    if room < 1:
        raise APIError(
            400,
            f"{what}: no room is left in the model's context of {limit} tokens; shorten the "
            "messages or lower the image/video sizes (max_pixels, max_video_tokens)",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        defaults = llm.default_sampling
        if "max_tokens" in defaults.explicit_fields and defaults.max_tokens is not None:
            max_tokens = defaults.max_tokens
        else:
            max_tokens = state.settings.default_max_tokens or room
        max_tokens = min(max_tokens, room)
    elif max_tokens > room:
        raise APIError(
            400,
            f"{what} and asks for max_tokens={max_tokens}, but the context holds {limit} tokens "
            f"(at most {room} new tokens fit)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "n": req.n}
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "min_tokens",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "seed",
    ):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    try:
        return SamplingParams(**kwargs).merged_with_defaults(llm.default_sampling)
    except PromptError as e:
        raise input_error(e) from e


# --- response pieces -------------------------------------------------------------------------
def seen(prompt: PromptInputs) -> dict[str, Any]:
    """The ``qwenvl`` extension: what the model saw of each image and video."""
    images = [
        {
            "original_width": g.original_width,
            "original_height": g.original_height,
            "resized_width": g.resized_width,
            "resized_height": g.resized_height,
            "tokens": g.num_tokens,
        }
        for g in prompt.image_geometries
    ]
    videos = []
    for v in prompt.videos:
        meta = v.metadata
        item: dict[str, Any] = {
            "original_width": v.original_width,
            "original_height": v.original_height,
            "resized_width": v.resized_width,
            "resized_height": v.resized_height,
            "frames": v.num_frames,
            "tokens": v.num_tokens,
        }
        if meta is not None:
            item.update(
                timestamps=[round(t, 3) for t in meta.timestamps],
                frame_indices=list(meta.frame_indices),
                source_fps=meta.fps,
                sample_fps=meta.sample_fps,
                duration=meta.duration,
            )
        videos.append(item)
    return {"images": images, "videos": videos}


def grounding_of(text: str, prompt: PromptInputs, image: int, family: str) -> list[dict]:
    if image >= len(prompt.images):
        raise APIError(
            400,
            f"qwenvl.grounding_image={image} but the request has {len(prompt.images)} image(s)",
            param="qwenvl.grounding_image",
        )
    out = []
    try:
        objects = ground(text, prompt.images[image].geometry, family)
    except Exception as e:  # the reply is model output: never let it fail the request
        logger.warning("grounding parse failed: %r", e)
        objects = []
    for obj in objects:
        d = asdict(obj)
        d["kind"] = type(obj).__name__.lower()
        out.append(d)
    return out


def logprobs_content(
    state: ServerState, token_ids: list[int], logprobs: list[dict[int, float]], top: int
) -> list[dict[str, Any]]:
    tok = state.llm.tokenizer

    def entry(tid: int, lp: float) -> dict[str, Any]:
        text = tok.decode([tid])
        return {"token": text, "logprob": max(lp, -9999.0), "bytes": list(text.encode())}

    out = []
    for tid, lps in zip(token_ids, logprobs):
        e = entry(tid, lps.get(tid, float("-inf")))
        ranked = sorted(lps.items(), key=lambda kv: -kv[1])[:top]
        e["top_logprobs"] = [entry(t, lp) for t, lp in ranked]
        out.append(e)
    return out


# --- running a request -----------------------------------------------------------------------
async def wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def next_or_disconnect(agen: AsyncIterator[StreamEvent], request: Request) -> Any:
    """The next event, or None when the stream ended; raises ``ClientGone`` on disconnect.

    Whatever ends the wait (disconnect, or this task being cancelled), the pending step of
    ``agen`` is cancelled and awaited, so the generator's cleanup (the abort) runs now."""
    nxt = asyncio.ensure_future(agen.__anext__())
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        nxt.cancel()
        await asyncio.gather(nxt, return_exceptions=True)
        raise
    finally:
        gone.cancel()
    if nxt not in done:
        nxt.cancel()
        await asyncio.gather(nxt, return_exceptions=True)
        raise ClientGone()
    try:
        return nxt.result()
    except StopAsyncIteration:
        return None


class ClientGone(Exception):
    """The client closed the connection; its request is aborted."""


def engine_error(e: BaseException) -> APIError:
    if isinstance(e, QwenVLError):
        return input_error(e)
    if isinstance(e, RuntimeError) and "shut down" in str(e):
        return APIError(
            503, str(e), type="server_error", code="unavailable", headers={"Retry-After": "5"}
        )
    logger.error("generation failed: %s", e)
    return APIError(500, f"generation failed: {e}", type="server_error")


@dataclass
class Job:
    """One admitted request on its way through the engine."""

    state: ServerState
    request: Request
    prompt: PromptInputs
    params: SamplingParams
    slot: Waiting
    started: float
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    first_token_at: float | None = None
    num_generated: int = 0

    async def events(self, first_wait_disconnect: bool = True) -> AsyncIterator[StreamEvent]:
        """All events; aborts on disconnect (non-streamed responses watch the socket here)."""
        agen = self.state.engine.generate(self.prompt, self.params, self.request_id)
        try:
            while True:
                try:
                    event = await next_or_disconnect(agen, self.request)
                except (ClientGone, asyncio.CancelledError):  # the client went away
                    self.state.metrics.add(aborted=1)
                    raise
                except Exception as e:
                    raise engine_error(e) from e
                if event is None:
                    return
                self._seen(event)
                yield event
        finally:
            self.slot.release()
            await agen.aclose()

    def _seen(self, event: StreamEvent) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.state.metrics.ttft.observe(self.first_token_at - self.started)
            self.slot.release()
        self.num_generated += len(event.token_ids)
        self.state.metrics.add(generation_tokens=len(event.token_ids))


async def collect(
    job: Job, n: int
) -> tuple[list[str], list[list[int]], list[list[dict]], list[str | None]]:
    """Text, token ids, logprobs and finish reason of each of the ``n`` completions, for a
    non-streamed response (``ClientGone`` if the client leaves first)."""
    texts, ids, reasons = [""] * n, [[] for _ in range(n)], [None] * n
    lps: list[list[dict]] = [[] for _ in range(n)]
    async for ev in job.events():
        texts[ev.index] += ev.text
        ids[ev.index] += ev.token_ids
        lps[ev.index] += ev.logprobs or []
        reasons[ev.index] = ev.finish_reason or reasons[ev.index]
    return texts, ids, lps, reasons


async def fetch_media(state: ServerState, messages: list[dict[str, Any]]) -> None:
    """Download the messages' http(s) images and videos in the fetch pool, all at once, and put
    the bytes in place of each URL. Downloads wait on the network, not the CPU: kept out of the
    preprocessing pool, a slow sender delays only its own request."""
    items = []
    for mi, message in enumerate(messages):
        content = message.get("content")
        for ci, part in enumerate(content if isinstance(content, list) else []):
            inner = part.get("image_url") or part.get("video_url")
            url = inner.get("url") if isinstance(inner, dict) else None
            if isinstance(url, str) and _scheme(url) in ("http", "https"):
                items.append((f"messages[{mi}].content[{ci}]", inner))
    if not items:
        return
    loop = asyncio.get_running_loop()
    policy = state.llm.processor.media_policy
    results = await asyncio.gather(
        *(
            loop.run_in_executor(state.fetch_pool, fetch_url, it["url"].strip(), policy)
            for _, it in items
        ),
        return_exceptions=True,
    )
    for (where, inner), result in zip(items, results):
        if isinstance(result, QwenVLError):
            raise input_error(type(result)(f"{where}: {result}"))
        if isinstance(result, BaseException):
            raise result
        inner["url"] = result


async def prepare(state: ServerState, fn: Callable[[], PromptInputs]) -> PromptInputs:
    """Run preprocessing in the pool; bad media and prompts become 400/413."""
    loop = asyncio.get_running_loop()
    try:
        prompt = await loop.run_in_executor(state.pool, fn)
    except QwenVLError as e:
        raise input_error(e) from e
    except (ValueError, TypeError, OSError, EOFError, RuntimeError, MemoryError) as e:
        # a decoder failing in a way the loaders did not foresee is still the input's fault
        logger.warning("preprocessing failed: %r", e)
        raise APIError(400, f"cannot process the request: {type(e).__name__}: {e}") from e
    vision = sum(im.num_tokens for im in prompt.images) + sum(v.num_tokens for v in prompt.videos)
    state.metrics.add(
        prompt_tokens=len(prompt.token_ids),
        vision_tokens=vision,
        images=len(prompt.images),
        videos=len(prompt.videos),
    )
    return prompt


def prompt_budget(state: ServerState, max_tokens: int | None) -> int:
    """`LLM.prompt_budget`: every request gets one, so text and image sizes are always checked
    before anything is decoded."""
    try:
        return state.llm.prompt_budget(max_tokens)
    except ContextLengthError as e:
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from e


def chat_prepare_fn(
    state: ServerState, req: ChatCompletionRequest
) -> tuple[Callable[[], PromptInputs], str, list[dict[str, Any]]]:
    """The preprocessing to run in the pool, the forced reply prefix, and the messages (whose
    media URLs `fetch_media` replaces with the downloaded bytes first)."""
    llm = state.llm
    messages = chat_messages(req, llm.processor.media_policy)
    tools = tools_of(req)
    prefix = _forced_prefix(req)
    # sized from the text and image headers before any pixel is decoded (the exact check, with
    # the tokens of a forced tool-call prefix, follows in sampling_params)
    budget = prompt_budget(state, req.max_completion_tokens or req.max_tokens)
    trusted = state.settings.special_tokens_in_content

    def run() -> PromptInputs:
        prompt = llm.processor.prepare_chat(
            messages,
            tools=tools,
            add_vision_id=req.qwenvl.add_vision_id,
            max_prompt_tokens=budget,
            special_tokens_in_content=trusted,
        )
        return _extend(prompt, llm, prefix) if prefix else prompt

    return run, prefix, messages


def completion_prepare_fn(state: ServerState, req: CompletionRequest) -> Callable[[], PromptInputs]:
    """A raw prompt is the caller's own template text: its special-token strings are markers."""
    text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    budget = prompt_budget(state, req.max_tokens)
    return functools.partial(state.llm.processor.prepare_media, text, [], max_prompt_tokens=budget)


def usage(prompt: PromptInputs, completion_tokens: int) -> dict[str, int]:
    n = len(prompt.token_ids)
    return {
        "prompt_tokens": n,
        "completion_tokens": completion_tokens,
        "total_tokens": n + completion_tokens,
    }


def sse(data: dict[str, Any] | str) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {body}\n\n".encode()


def message_of(text: str, prefix: str, tools_on: bool) -> tuple[dict[str, Any], bool]:
    """The assistant message of one choice, and whether it holds tool calls."""
    if not tools_on:
        return {"role": "assistant", "content": text, "tool_calls": []}, False
    content, calls = extract_tool_calls(prefix + text)
    if not calls:
        return {"role": "assistant", "content": prefix + text, "tool_calls": []}, False
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [c.to_openai() for c in calls],
    }, True


def new_tool_streams(n: int, prefix: str) -> list[ToolCallStream]:
    streams = [ToolCallStream() for _ in range(n)]
    for s in streams:
        s.feed(prefix)
    return streams


def tool_deltas(stream: ToolCallStream, calls: list) -> list[dict[str, Any]]:
    first = len(stream.calls) - len(calls)
    return [{"index": first + k, **c.to_openai()} for k, c in enumerate(calls)]
