"""A request and its sequences: the state the scheduler moves between WAITING, RUNNING and
FINISHED, and the per-token bookkeeping that turns sampled ids into streamed text.

A request holds one prompt (token ids, M-RoPE positions, vision items); each of its ``n``
completions is a :class:`Sequence` that is scheduled, cached and possibly preempted on its own.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from qwenvl.engine.block_manager import MMSpan
from qwenvl.outputs import CompletionOutput, StreamEvent
from qwenvl.processing.prompt import PromptInputs
from qwenvl.sampling import SamplingParams
from qwenvl.tokenizer import IncrementalDetokenizer, Tokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class VisionItem:
    """One image or video of a prompt: where its placeholder tokens sit and what it holds."""

    kind: str  # "image" or "video"
    index: int  # among the prompt's items of that kind
    start: int  # first placeholder token
    length: int  # placeholder tokens = merged vision tokens
    key: str  # content hash of the preprocessed pixels and grid (encoder-cache key)
    prefix_key: str  # key + what else changes the KV (a video's time scale)
    pixel_values: torch.Tensor  # float32 rows, or a video's uint8 patches (then ``lut`` is set)
    grid_thw: tuple[int, int, int]
    lut: torch.Tensor | None = None

    @property
    def end(self) -> int:
        return self.start + self.length


def content_key(
    pixel_values: torch.Tensor, grid_thw: tuple[int, int, int], lut: torch.Tensor | None = None
) -> str:
    """A digest of preprocessed pixels and grid: equal keys mean equal vision embeddings."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(tuple(grid_thw)).encode())
    for t in (pixel_values, lut):
        if t is not None:
            digest.update(str(t.dtype).encode())
            digest.update(t.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def vision_items(
    prompt: PromptInputs, image_token_id: int, video_token_id: int
) -> list[VisionItem]:
    """Locate every image/video's placeholder run in the prompt, in order."""
    items: list[VisionItem] = []
    ids = prompt.token_ids
    for kind, token, media in (
        ("image", image_token_id, prompt.images),
        ("video", video_token_id, prompt.videos),
    ):
        pos = 0
        for k, item in enumerate(media):
            start = ids.index(token, pos)
            pixels = item.patches if kind == "video" else item.pixel_values
            lut = item.lut if kind == "video" else None
            key = getattr(item, "content_key", None)
            if key is None:
                key = content_key(pixels, item.grid_thw, lut)
                item.content_key = key  # type: ignore[attr-defined]  # hashed once per item
            spgt = getattr(item, "second_per_grid_t", None)
            prefix_key = key if spgt is None else f"{key}@{float(spgt)!r}"
            items.append(
                VisionItem(
                    kind,
                    k,
                    start,
                    item.num_tokens,
                    key,
                    prefix_key,
                    pixels,
                    tuple(item.grid_thw),
                    lut,
                )
            )
            pos = start + item.num_tokens
    items.sort(key=lambda it: it.start)
    return items


class Request:
    """One prompt and its sampling parameters; owns the vision features while it lives."""

    def __init__(
        self,
        request_id: str,
        prompt: PromptInputs,
        params: SamplingParams,
        items: list[VisionItem],
        arrival: int,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.items = items
        self.spans = [MMSpan(it.start, it.length, it.prefix_key) for it in items]
        self.arrival = arrival
        self.features: dict[int, torch.Tensor] = {}  # item number -> merged embeddings
        self.sequences: list[Sequence] = []

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.sequences)

    def outputs(self) -> list[CompletionOutput]:
        return [s.output() for s in self.sequences]


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One completion: prompt + generated ids, how many have KV, and its streaming state."""

    request: Request
    index: int
    max_new: int
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV is in the cache
    token_ids: list[int] = field(default_factory=list)  # generated
    text: str = ""
    emitted: int = 0  # characters of text already streamed
    pending: list[int] = field(default_factory=list)  # ids not yet streamed
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    num_preemptions: int = 0
    grammar: Any = None  # an llguidance matcher when the reply is constrained (engine/grammar.py)

    @classmethod
    def create(
        cls,
        request: Request,
        index: int,
        tokenizer: Tokenizer,
        max_new: int,
        device: torch.device | str = "cpu",
    ) -> Sequence:
        p = request.params
        # completion `index` of a seeded request draws from seed + index, wrapped to the uint64
        # range torch's generators take
        seed = None if p.seed is None else (p.seed + index) % 2**64
        return cls(
            request=request,
            index=index,
            max_new=max_new,
            detok=IncrementalDetokenizer(tokenizer, skip_special_tokens=p.skip_special_tokens),
            generator=None if seed is None else torch.Generator(device).manual_seed(seed),
            logprobs=[] if p.logprobs is not None else None,
        )

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt.token_ids

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    def ids(self, start: int, end: int) -> list[int]:
        """Token ids ``[start, end)`` of prompt + generated, without building the whole list
        (the decode step asks for one token of a long sequence)."""
        n_prompt = len(self.prompt_ids)
        if start >= n_prompt:
            return self.token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_ids[start:end] + self.token_ids[: max(0, end - n_prompt)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.token_ids)

    def positions(self, start: int, end: int) -> torch.Tensor:
        """M-RoPE positions ``[3, end - start]`` of tokens ``[start, end)``; generated tokens
        sit at ``index + rope_delta`` on all three streams."""
        prompt = self.request.prompt
        n_prompt = len(prompt.token_ids)
        parts = []
        if start < n_prompt:
            parts.append(prompt.positions[:, start : min(end, n_prompt)])
        if end > n_prompt:
            tail = torch.arange(max(start, n_prompt), end) + prompt.rope_delta
            parts.append(tail.expand(3, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # --- tokens in, text out -----------------------------------------------------------------
    def append(self, token: int, eos: set[int]) -> StreamEvent | None:
        """Add a sampled token, apply the stop rules, and return the text to stream (if any)."""
        p = self.params
        self.token_ids.append(token)
        self.pending.append(token)
        if self.grammar is not None:
            self.grammar.consume_token(token)
        if token in eos and not p.ignore_eos:
            self.finish_reason, self.stop_reason = "stop", None
        elif token in p.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token
        is_stop_token = self.finish_reason is not None
        if not is_stop_token or not p.skip_special_tokens:
            self.text += self.detok.add(token)
        if not is_stop_token and self.grammar is not None and self.grammar.is_stopped():
            self.finish_reason, self.stop_reason = "stop", None  # complete: only EOS could follow
        if p.stop and not is_stop_token:
            self._check_stop_strings()
        if self.finish_reason is None and len(self.token_ids) >= self.max_new:
            self.finish_reason = "length"
        if self.finish_reason is not None and not isinstance(self.stop_reason, str):
            self.text += self.detok.flush()
        return self._event()

    def abort(self) -> StreamEvent:
        self.finish_reason, self.stop_reason = "abort", None
        event = self._event()
        assert event is not None
        return event

    def _event(self) -> StreamEvent | None:
        # Hold back text that could still become a stop string, so it is never streamed.
        hold = 0 if self.finish_reason else max((len(s) for s in self.params.stop), default=1) - 1
        upto = max(self.emitted, len(self.text) - hold)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        if not delta and self.finish_reason is None:
            return None
        logprobs = None
        if self.logprobs is not None:
            logprobs = self.logprobs[len(self.logprobs) - len(self.pending) :]
        event = StreamEvent(
            self.request.request_id, self.index, delta, self.pending, self.finish_reason, logprobs
        )
        self.pending = []
        return event

    def _check_stop_strings(self) -> None:
        for s in self.params.stop:
            pos = self.text.find(s, max(0, self.emitted - len(s)))  # only the tail can match anew
            if pos >= 0:
                end = pos + len(s) if self.params.include_stop_str_in_output else pos
                self.text = self.text[:end]
                self.finish_reason, self.stop_reason = "stop", s
                return

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=self.logprobs,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
        )
