"""From a validated OpenAI request to engine inputs: the prompt (media fetched and preprocessed)
and the sampling parameters.

Nothing here blocks the event loop: media are downloaded in the fetch pool and preprocessed in
the preprocessing pool, so a slow sender or a large image delays only its own request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import urllib.parse
from collections.abc import Callable
from typing import Any

from qwenvl.errors import ContextLengthError, MediaError, PromptError, QwenVLError
from qwenvl.processing.fetch import fetch_url
from qwenvl.processing.media import check_local_path
from qwenvl.processing.policy import MediaPolicy
from qwenvl.processing.prompt import PromptInputs
from qwenvl.sampling import SamplingParams
from qwenvl.server.errors import APIError, input_error
from qwenvl.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FramesPart,
    ImagePart,
    NamedToolChoice,
    VideoPart,
)
from qwenvl.server.state import ServerState
from qwenvl.structured import StructuredOutput
from qwenvl.tool_calls import tool_call_grammar

logger = logging.getLogger(__name__)

# request fields passed to SamplingParams as they are, when set
_SAMPLING_FIELDS = (
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
)


# --- media URLs ------------------------------------------------------------------------------
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


async def fetch_media(state: ServerState, messages: list[dict[str, Any]]) -> None:
    """Download the messages' http(s) images and videos in the fetch pool, all at once, and put
    the bytes in place of each URL. Downloads wait on the network, not the CPU: kept out of the
    preprocessing pool, a slow sender delays only its own request."""
    items = [it for mi, m in enumerate(messages) for it in _remote_media(mi, m)]
    if not items:
        return
    loop = asyncio.get_running_loop()
    policy = state.llm.processor.media_policy
    results = await asyncio.gather(
        *(
            loop.run_in_executor(state.fetch_pool, fetch_url, holder[key].strip(), policy)
            for _, holder, key in items
        ),
        return_exceptions=True,
    )
    for (where, holder, key), result in zip(items, results):
        if isinstance(result, QwenVLError):
            raise input_error(type(result)(f"{where}: {result}"))
        if isinstance(result, BaseException):
            raise result
        holder[key] = result


def _remote_media(mi: int, message: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(where, holder, key)`` of every http(s) URL in a message: ``holder[key]`` is the URL
    (an ``image_url``/``video_url`` object's ``url``, or a frame of a frame list)."""
    out: list[tuple[str, Any, Any]] = []
    content = message.get("content")
    for ci, part in enumerate(content if isinstance(content, list) else []):
        inner = part.get("image_url") or part.get("video_url")
        if isinstance(inner, dict):
            out.append((f"messages[{mi}].content[{ci}]", inner, "url"))
        elif isinstance(part.get("video"), list):
            frames = part["video"]
            out += [
                (f"messages[{mi}].content[{ci}].video[{k}]", frames, k) for k in range(len(frames))
            ]
    return [
        o for o in out if isinstance(o[1][o[2]], str) and _scheme(o[1][o[2]]) in ("http", "https")
    ]


# --- prompts ---------------------------------------------------------------------------------
def chat_messages(
    req: ChatCompletionRequest, policy: MediaPolicy, max_pixels: int | None = None
) -> list[dict[str, Any]]:
    """The messages as ``Processor.prepare_chat`` reads them, every media URL checked first."""
    messages = []
    for mi, m in enumerate(req.messages):
        for ci, part in enumerate(m.content if isinstance(m.content, list) else []):
            where = f"messages[{mi}].content[{ci}]"
            if isinstance(part, FramesPart):
                for k, url in enumerate(part.video):
                    check_media_url(url, f"{where}.video[{k}]", policy)
            elif isinstance(part, (ImagePart, VideoPart)):
                inner = part.image_url if isinstance(part, ImagePart) else part.video_url
                check_media_url(inner if isinstance(inner, str) else inner.url, where, policy)
        messages.append(m.to_dict(max_pixels))
    return messages


def tools_of(req: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools the template shows the model (none when ``tool_choice`` is "none"; only the
    named one when a function is named)."""
    if not req.tools or req.tool_choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if isinstance(req.tool_choice, NamedToolChoice):
        tools = [t for t in tools if t["function"]["name"] == req.tool_choice.function.name]
    return tools


def prompt_budget(state: ServerState, max_tokens: int | None) -> int:
    """`LLM.prompt_budget`: every request gets one, so text and image sizes are always checked
    before anything is decoded."""
    try:
        return state.llm.prompt_budget(max_tokens)
    except ContextLengthError as e:
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from e


def chat_prepare_fn(
    state: ServerState, req: ChatCompletionRequest
) -> tuple[Callable[[], PromptInputs], list[dict[str, Any]]]:
    """The preprocessing to run in the pool and the messages (whose media URLs `fetch_media`
    replaces with the downloaded bytes first)."""
    llm = state.llm
    messages = chat_messages(req, llm.processor.media_policy, llm.processor.vision.max_pixels)
    tools = tools_of(req)
    # sized from the text and image headers before any pixel is decoded (the exact check
    # follows in sampling_params)
    budget = prompt_budget(state, req.max_completion_tokens or req.max_tokens)
    trusted = state.settings.special_tokens_in_content

    def run() -> PromptInputs:
        return llm.processor.prepare_chat(
            messages,
            tools=tools,
            add_vision_id=req.qwenvl.add_vision_id,
            max_prompt_tokens=budget,
            special_tokens_in_content=trusted,
        )

    return run, messages


def completion_prepare_fn(state: ServerState, req: CompletionRequest) -> Callable[[], PromptInputs]:
    """A raw prompt is the caller's own template text: its special-token strings are markers."""
    text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    budget = prompt_budget(state, req.max_tokens)
    return functools.partial(state.llm.processor.prepare_media, text, [], max_prompt_tokens=budget)


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
    state.metrics.add(
        prompt_tokens=len(prompt.token_ids),
        vision_tokens=_vision_tokens(prompt),
        images=len(prompt.images),
        videos=len(prompt.videos),
    )
    return prompt


def _vision_tokens(prompt: PromptInputs) -> int:
    return sum(im.num_tokens for im in prompt.images) + sum(v.num_tokens for v in prompt.videos)


# --- sampling --------------------------------------------------------------------------------
def _max_tokens(state: ServerState, prompt: PromptInputs, max_tokens: int | None) -> int:
    """``max_tokens`` checked against the context up front, with the numbers; when the request
    sets none, the checkpoint's default, else the server's, else the rest of the context."""
    engine = state.llm.engine
    n_prompt = len(prompt.token_ids)
    limit = min(engine.max_model_len, engine.kv_capacity_tokens)
    room = limit - n_prompt
    what = f"the prompt has {n_prompt} tokens ({_vision_tokens(prompt)} of them image/video tokens)"
    if room < 1:
        raise APIError(
            400,
            f"{what}: no room is left in the model's context of {limit} tokens; shorten the "
            "messages or lower the image/video sizes (max_pixels, max_video_tokens)",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        defaults = state.llm.default_sampling
        if "max_tokens" in defaults.explicit_fields and defaults.max_tokens is not None:
            max_tokens = defaults.max_tokens
        else:
            max_tokens = state.settings.default_max_tokens or room
        return min(max_tokens, room)
    if max_tokens > room:
        raise APIError(
            400,
            f"{what} and asks for max_tokens={max_tokens}, but the context holds {limit} tokens "
            f"(at most {room} new tokens fit)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    prompt: PromptInputs,
    state: ServerState,
    max_tokens: int | None,
    logprobs: int | None,
) -> SamplingParams:
    """The request's explicit fields over the checkpoint defaults."""
    kwargs: dict[str, Any] = {"max_tokens": _max_tokens(state, prompt, max_tokens), "n": req.n}
    for name in _SAMPLING_FIELDS:
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    try:
        kwargs["structured"] = structured_of(req)
        return SamplingParams(**kwargs).merged_with_defaults(state.llm.default_sampling)
    except PromptError as e:
        raise input_error(e) from e


def structured_of(req: ChatCompletionRequest | CompletionRequest) -> StructuredOutput | None:
    """The one constraint a request puts on its reply: OpenAI's ``response_format``, vLLM's
    ``structured_outputs`` or ``guided_*`` fields, or a tool call that ``tool_choice``
    ("required" or a named function) demands; two at once are refused."""
    found: dict[str, StructuredOutput] = {}
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        found["response_format"] = StructuredOutput(json_object=True)
    elif fmt is not None and fmt.type == "json_schema":
        assert fmt.json_schema is not None
        schema = fmt.json_schema.schema_
        found["response_format"] = (
            StructuredOutput(json_schema=schema) if schema else StructuredOutput(json_object=True)
        )
    so = req.structured_outputs
    if so is not None:
        given = so.model_dump(exclude_none=True, by_alias=False)
        if given.get("json_object") is False:
            given.pop("json_object")
        if "json_" in given:
            given["json_schema"] = given.pop("json_")
        found["structured_outputs"] = StructuredOutput(**given)
    guided = {
        "guided_json": ("json_schema", req.guided_json),
        "guided_regex": ("regex", req.guided_regex),
        "guided_choice": ("choice", req.guided_choice),
        "guided_grammar": ("grammar", req.guided_grammar),
    }
    for field, (kind, value) in guided.items():
        if value is not None:
            found[field] = StructuredOutput(**{kind: value})
    choice = getattr(req, "tool_choice", None)
    if choice == "required" or isinstance(choice, NamedToolChoice):
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        found["tool_choice"] = StructuredOutput(grammar=tool_call_grammar(tools, name))
    if len(found) > 1:
        raise PromptError(
            f"a request may constrain its reply one way only; it sets {', '.join(found)}"
        )
    return next(iter(found.values()), None)
