"""The OpenAI wire format at the HTTP boundary: pydantic request models, and parsing the body.

Requests are validated strictly: an unknown field anywhere in a content part (or an option qwenvl
does not honour) is a 400 naming its path, never silently dropped. Fields OpenAI defines that have
no effect here are accepted only with their no-op values (``logit_bias`` empty, ``response_format``
text...). qwenvl's own per-item options (``min_pixels``, ``fps``, ``max_video_tokens``...) sit in
the ``image_url`` / ``video_url`` object or at the top level of the part, as in qwen-vl-utils.

Extension: the request field ``"qwenvl": {"grounding": true, "add_vision_id": false}`` asks for
parsed boxes/points in original-image pixels; responses carry ``"qwenvl": {"images": [...],
"videos": [...]}`` (what the model saw) and, when asked, ``"grounding"``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qwenvl.sampling import INT64_MAX, INT64_MIN
from qwenvl.server.errors import APIError
from qwenvl.tokenizer import lone_surrogate, surrogate_message

PositiveInt = Annotated[int, Field(gt=0)]
PositiveNum = Annotated[float, Field(gt=0)]
NonNegNum = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- content parts ---------------------------------------------------------------------------
class ImageOptions(_Strict):
    """qwenvl's per-image options (see ``processing.image.resolve_image_size``)."""

    min_pixels: PositiveInt | None = None
    max_pixels: PositiveInt | None = None
    resized_height: PositiveInt | None = None
    resized_width: PositiveInt | None = None


class VideoOptions(_Strict):
    """qwenvl's per-video options (``processing.video.VideoSampling``)."""

    fps: PositiveNum | None = None
    nframes: PositiveInt | None = None
    min_frames: PositiveInt | None = None
    max_frames: PositiveInt | None = None
    video_start: NonNegNum | None = None
    video_end: NonNegNum | None = None
    min_pixels: PositiveNum | None = None
    max_pixels: PositiveNum | None = None
    total_pixels: PositiveNum | None = None
    resized_height: PositiveInt | None = None
    resized_width: PositiveInt | None = None
    max_video_tokens: PositiveInt | None = None


class ImageURL(ImageOptions):
    url: str
    # OpenAI's knob: "low" caps the image at 512x512 pixels' worth of area (unless max_pixels is
    # given); "auto" and "high" keep the model's full resolution.
    detail: Literal["auto", "low", "high"] | None = None


class VideoURL(VideoOptions):
    url: str


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(ImageOptions):
    type: Literal["image_url"]
    image_url: ImageURL | str


class VideoPart(VideoOptions):
    type: Literal["video_url"]
    video_url: VideoURL | str


MAX_FRAME_LIST = 768  # qwen-vl-utils' most frames of a video


class FramesPart(VideoOptions):
    """A video given as its frames, each an image URL (qwen-agent and qwen-vl-utils send
    ``{"type": "video", "video": [url, ...]}``)."""

    type: Literal["video"]
    video: Annotated[list[str], Field(min_length=1, max_length=MAX_FRAME_LIST)]


Part = Annotated[TextPart | ImagePart | VideoPart | FramesPart, Field(discriminator="type")]

LOW_DETAIL_PIXELS = 512 * 512


def part_to_item(
    part: TextPart | ImagePart | VideoPart | FramesPart, max_pixels: int | None = None
) -> dict[str, Any]:
    """A validated part as the content item ``Processor.prepare_chat`` reads. ``max_pixels``:
    the server's own image cap, which ``detail: "low"`` may only lower."""
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, FramesPart):
        return part.model_dump(exclude_none=True)
    kind = "image" if isinstance(part, ImagePart) else "video"
    inner = part.image_url if isinstance(part, ImagePart) else part.video_url
    options = part.model_dump(exclude={"type", f"{kind}_url"}, exclude_none=True)
    if isinstance(inner, str):
        url = inner
    else:
        url = inner.url
        options.update(inner.model_dump(exclude={"url", "detail"}, exclude_none=True))
        if getattr(inner, "detail", None) == "low" and "max_pixels" not in options:
            low = LOW_DETAIL_PIXELS if max_pixels is None else min(LOW_DETAIL_PIXELS, max_pixels)
            options["max_pixels"] = low
            options["min_pixels"] = min(options.get("min_pixels", 3136), low)
    return {"type": f"{kind}_url", f"{kind}_url": {"url": url, **options}}


# --- messages --------------------------------------------------------------------------------
class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # What clients send that says nothing to the model, accepted and ignored: a message `id`
    # (qwen-agent on tool results, the Responses API), qwen-agent's own `extra` (its function
    # ids), and the fields of a response message a client appends as it is (refusal,
    # annotations, audio, reasoning, a legacy function_call).
    id: str | None = None
    extra: dict[str, Any] | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    reasoning_content: str | None = None

    def to_dict(self, max_pixels: int | None = None) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role}
        if isinstance(self.content, list):
            out["content"] = [part_to_item(p, max_pixels) for p in self.content]
        else:
            out["content"] = self.content if self.content is not None else ""
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and role == "tool":
            out["name"] = self.name
        return out


# --- tools -----------------------------------------------------------------------------------
class FunctionDef(_Strict):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


# --- requests --------------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class QwenVLOptions(_Strict):
    grounding: bool = False  # parse boxes/points of each choice in original-image pixels
    grounding_image: Annotated[int, Field(ge=0)] = 0  # which image the coordinates refer to
    add_vision_id: bool = False  # "Picture 1:" labels before each image


class JsonSchemaFormat(_Strict):
    name: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: ``text`` (free), ``json_object`` (any JSON object) or
    ``json_schema`` (a reply valid against ``json_schema.schema``; ``strict`` is honoured
    always: the sampler cannot leave the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' (and only then)")
        return self


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs`` body field: one of a JSON schema, any JSON object, a
    regex, a choice, a Lark grammar."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class _SamplingFields(_Strict):
    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    max_tokens: PositiveInt | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    # vLLM's names, so clients written for it work unchanged (one constraint per request)
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: there is one engine

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    store: Literal[False] | None = None
    metadata: dict[str, str] | None = None
    qwenvl: QwenVLOptions = Field(default_factory=QwenVLOptions)

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            if not self.tools:
                raise ValueError(f"tool_choice={self.tool_choice!r} needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names {self.tool_choice.function.name!r}, which is not among "
                    f"the tools ({sorted(names)})"
                )
        return self


class CompletionRequest(_SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: Literal[False] | None = None
    suffix: None = None
    best_of: Literal[1] | None = None


# --- invalid bodies --------------------------------------------------------------------------
def validation_error(e: ValidationError) -> APIError:
    """The first problems of a pydantic error, each with its path (e.g.
    ``messages.0.content.1.image_url.foo``). Of a union's alternatives, only the one that got
    furthest is reported (``content`` as a string is not what a part list meant)."""
    found = []
    for err in e.errors(include_url=False):
        loc = tuple(str(x) for x in err["loc"] if not _is_union_tag(x))
        found.append((loc, err["msg"]))
    kept = [
        (loc, msg)
        for loc, msg in found
        if not any(other[: len(loc)] == loc and len(other) > len(loc) for other, _ in found)
    ]
    kept = list(dict.fromkeys(kept))
    parts = [f"{'.'.join(loc)}: {msg}" if loc else msg for loc, msg in kept[:3]]
    more = f" (and {len(kept) - 3} more)" if len(kept) > 3 else ""
    param = ".".join(kept[0][0]) if kept and kept[0][0] else None
    return APIError(400, "; ".join(parts) + more, param=param, code="invalid_request")


def _is_union_tag(x: object) -> bool:
    # pydantic names union members in paths ("str", "list[...]", "function-after[...]")
    return isinstance(x, str) and (
        "[" in x or x in ("str", "int", "float", "bool", "ImageURL", "VideoURL")
    )


# JSON deeper than this is refused before validation: nothing OpenAI defines nests past ~10
# levels (a tool's JSON schema is the deepest), and recursive code downstream must not overflow.
MAX_JSON_DEPTH = 64


def parse_json_body(raw: bytes) -> Any:
    """The request body as JSON, or a 400 naming what is wrong with it: not JSON, nested too
    deeply, or holding a string that is not valid Unicode (a lone UTF-16 surrogate such as
    ``"\\ud800"``, which JSON can spell but no UTF-8 text can hold)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(
            400, f"the request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from e
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            _check_unicode(value, path)
            continue
        if isinstance(value, (dict, list)) and depth > MAX_JSON_DEPTH:
            raise APIError(
                400,
                f"the request body is nested more than {MAX_JSON_DEPTH} levels deep (at "
                f"{path or 'the top'})",
            )
        if isinstance(value, dict):
            for key, item in value.items():
                _check_unicode(key, path)
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}", depth + 1) for i, item in enumerate(value))
    return body


def _check_unicode(text: str, path: str) -> None:
    at = lone_surrogate(text)
    if at is not None:
        raise APIError(
            400,
            f"{path or 'the request body'}: {surrogate_message(text, at)}",
            param=path or None,
            code="invalid_request",
        )
