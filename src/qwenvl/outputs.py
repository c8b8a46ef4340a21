"""What generation returns, in the vLLM shape users know: RequestOutput with CompletionOutputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenvl.processing.image import ImageGeometry
from qwenvl.tool_calls import ToolCall


@dataclass
class CompletionOutput:
    """One sampled continuation of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (eos, stop string or stop token) or "length"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it, if any
    logprobs: list[dict[int, float]] | None = None  # per token: chosen + top-k ids -> logprob
    cumulative_logprob: float | None = None
    # Set when the request offered tools (``LLM.chat(..., tools=[...])``): the parsed
    # ``<tool_call>`` blocks (None when there are none) and the text without them (None when
    # nothing else is left). Without tools both stay None; read ``text``.
    tool_calls: list[ToolCall] | None = None
    content: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All completions of one request, plus what the model saw of the prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    images: list[ImageGeometry] = field(default_factory=list)
    family: str | None = None  # model_type of the family that wrote it (its coordinate convention)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def grounding(self, completion: int = 0, image: int = 0) -> list:
        """Boxes, points and quads of a completion, in pixels of the original ``image``."""
        from qwenvl.grounding import ground

        if not self.images:
            raise ValueError("this request had no images to ground in")
        if self.family is None:
            raise ValueError("no model family recorded: call grounding.ground with the family")
        return ground(self.outputs[completion].text, self.images[image], self.family)


@dataclass
class StreamEvent:
    """A streamed piece of one completion: new text and token ids since the last event."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None  # of ``token_ids``, when requested
