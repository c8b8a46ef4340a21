"""SamplingParams: how one request picks its tokens (vLLM's field names and conventions).

``temperature=0`` is greedy decoding. A checkpoint's ``generation_config.json`` supplies defaults
through :meth:`SamplingParams.from_generation_config`; :meth:`SamplingParams.merged_with_defaults`
lays a user's params over those defaults so that only the fields the user actually passed win.

Explicit vs default fields: the constructor records the names of the keyword arguments it was given
in ``explicit_fields``. ``SamplingParams(temperature=0.7)`` therefore overrides only the temperature
of the checkpoint defaults, while ``SamplingParams()`` overrides nothing. ``dataclasses.replace``
goes through the constructor and so marks every field explicit; use :meth:`SamplingParams.replace`
to keep the record. Importing this module does not import torch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from qwenvl.errors import ConfigError, PromptError
from qwenvl.structured import StructuredOutput

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS); layers/sampler.py uses the same value.
GREEDY_TEMPERATURE = 1e-5

_T = TypeVar("_T")

# what a 64-bit signed integer holds: the range of seed (OpenAI's and vLLM's) and of every int
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _track_explicit_fields(cls: type[_T]) -> type[_T]:
    """Wrap the dataclass ``__init__`` so each instance records which fields its caller passed."""
    generated_init = cls.__init__

    def __init__(self: Any, **kwargs: Any) -> None:
        generated_init(self, **kwargs)
        object.__setattr__(self, "_explicit", frozenset(kwargs))

    __init__.__doc__ = generated_init.__doc__
    __init__.__signature__ = inspect.signature(generated_init)  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]
    return cls


@_track_explicit_fields
@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Sampling options of one request, in the vLLM convention. All arguments are keyword-only.

    Args:
        n: number of completions to return for the prompt.
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling; keep the smallest set of tokens whose probability sums to at
            least ``top_p`` (1 = off).
        top_k: keep only the ``top_k`` most likely tokens; 0 or -1 = off (-1 is stored as 0).
        min_p: drop tokens whose probability is below ``min_p`` times the top token's (0 = off).
        repetition_penalty: transformers' penalty over prompt and generated tokens (1 = off).
        presence_penalty: OpenAI penalty for any generated token that already appeared, in [-2, 2].
        frequency_penalty: OpenAI penalty per previous occurrence of a generated token, in [-2, 2].
        max_tokens: most tokens to generate; None means up to the context length.
        min_tokens: generate at least this many tokens before EOS or stop may end the output.
        stop: strings that end generation; stored as a tuple.
        stop_token_ids: token ids that end generation (besides EOS); stored as a tuple.
        ignore_eos: keep generating after the EOS token.
        seed: per-request seed, so the request's samples do not depend on the rest of the batch.
        logprobs: number of top log-probabilities to return per token (None = none). The chosen
            token's log-probability is returned too.
        skip_special_tokens: drop special tokens when detokenizing.
        include_stop_str_in_output: keep the matched stop string in the output text.
        structured: what the reply must match (:class:`~qwenvl.structured.StructuredOutput`:
            a JSON schema, any JSON object, a regex, a choice, a Lark grammar); logprobs are
            then those of the constrained distribution.

    Raises:
        PromptError: an option is out of range or of the wrong type.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredOutput | None = None
    # Not a dataclass field (so repr, ==, hash and asdict ignore it); set per instance by
    # _track_explicit_fields.
    _explicit: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            self._set(name, _as_float(name, getattr(self, name)))
        for name in ("presence_penalty", "frequency_penalty"):
            self._set(name, _as_float(name, getattr(self, name)))
        for name in ("n", "top_k", "min_tokens"):
            self._set(name, _as_int(name, getattr(self, name)))
        for name in ("max_tokens", "seed", "logprobs"):
            value = getattr(self, name)
            self._set(name, None if value is None else _as_int(name, value))
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise PromptError(f"{name} must be a bool, got {getattr(self, name)!r}")

        if self.n < 1:
            raise PromptError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0.0:
            raise PromptError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise PromptError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise PromptError(f"top_k must be -1 or 0 (off) or a positive int, got {self.top_k}")
        if self.top_k == -1:
            self._set("top_k", 0)
        if not 0.0 <= self.min_p <= 1.0:
            raise PromptError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0.0:
            raise PromptError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise PromptError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise PromptError(f"max_tokens must be at least 1 (or None), got {self.max_tokens}")
        if self.min_tokens < 0:
            raise PromptError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise PromptError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise PromptError(f"logprobs must be >= 0 (or None), got {self.logprobs}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise PromptError("structured must be a StructuredOutput")
        self._set("stop", _as_stop(self.stop))
        self._set("stop_token_ids", _as_stop_token_ids(self.stop_token_ids))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @property
    def explicit_fields(self) -> frozenset[str]:
        """Names of the fields the caller passed to the constructor."""
        return self._explicit

    @property
    def is_greedy(self) -> bool:
        """Whether the sampler takes the argmax for this request."""
        return self.temperature < GREEDY_TEMPERATURE

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied; the changed fields join the explicit ones."""
        kwargs = {name: getattr(self, name) for name in self._explicit}
        kwargs.update(changes)
        return type(self)(**kwargs)

    def merged_with_defaults(self, defaults: SamplingParams | None) -> SamplingParams:
        """These params laid over ``defaults``: fields set explicitly here win, the rest come
        from ``defaults`` (typically :meth:`from_generation_config`).

        ``LLM.chat(params=None)`` is ``SamplingParams().merged_with_defaults(checkpoint)``, which
        is the checkpoint's defaults unchanged.
        """
        if defaults is None:
            return self
        kwargs = {name: getattr(defaults, name) for name in defaults.explicit_fields}
        kwargs.update({name: getattr(self, name) for name in self._explicit})
        return type(self)(**kwargs)

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from a checkpoint's ``generation_config.json``, with ``overrides`` winning.

        Reads ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
        ``repetition_penalty`` and ``max_new_tokens``; other keys and ``null`` values are ignored.
        ``do_sample: false`` means greedy (temperature 0). As in vLLM, a config without
        ``do_sample`` keeps its temperature rather than falling back to transformers' greedy
        default. The returned params mark the fields read from the config (and the overrides)
        as explicit.

        Raises:
            ConfigError: a value in the config is invalid.
            PromptError: an override is invalid.
        """
        keys = {
            "temperature": "temperature",
            "top_p": "top_p",
            "top_k": "top_k",
            "min_p": "min_p",
            "repetition_penalty": "repetition_penalty",
            "max_new_tokens": "max_tokens",
        }
        kwargs = {name: config[key] for key, name in keys.items() if config.get(key) is not None}
        if config.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        try:
            defaults = cls(**kwargs)
        except PromptError as e:
            raise ConfigError(f"invalid sampling default in generation_config.json: {e}") from e
        if not overrides:
            return defaults
        return cls(**overrides).merged_with_defaults(defaults)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PromptError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise PromptError(f"{name} must be finite, got {value!r}")
    return float(value)


def _as_int(name: str, value: Any) -> int:
    """An int that fits in 64 bits: every count and id ends up in an int64 tensor, where a
    larger Python int fails the whole batch's step."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PromptError(f"{name} must be an int, got {value!r}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise PromptError(f"{name} must be a 64-bit signed integer, got {value}")
    return int(value)


def _as_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
        raise PromptError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return tuple(stop)


def _as_stop_token_ids(ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    if (
        isinstance(ids, str)
        or not isinstance(ids, Sequence)
        or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= INT64_MAX for i in ids
        )
    ):
        raise PromptError(f"stop_token_ids must be a list of non-negative ints, got {ids!r}")
    return tuple(ids)


__all__ = ["GREEDY_TEMPERATURE", "SamplingParams"]
