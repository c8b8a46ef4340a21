"""Tests for qwenvl/sampling.py: SamplingParams validation, checkpoint defaults, overrides."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from qwenvl.errors import ConfigError, PromptError
from qwenvl.sampling import SamplingParams

# Qwen2.5-VL-*-Instruct's generation_config.json.
QWEN25_VL_GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
    "transformers_version": "4.49.0",
}


def test_defaults_follow_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs) == (16, 0, None, None)
    assert p.stop == () and p.stop_token_ids == ()
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output
    assert not p.is_greedy
    assert p.explicit_fields == frozenset()


def test_greedy_is_allowed() -> None:
    p = SamplingParams(temperature=0)
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.is_greedy


def test_normalisation() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[7, 9]).stop_token_ids == (7, 9)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(max_tokens=None).max_tokens is None
    # Lists are stored as tuples, so the frozen params stay hashable.
    assert hash(SamplingParams(stop=["a"])) == hash(SamplingParams(stop=("a",)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must be"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k must be an int"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "must not exceed"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"seed": True}, "seed must be an int"),
        ({"logprobs": -1}, "logprobs"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool"),
    ],
)
def test_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(PromptError, match=match):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_validation_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        SamplingParams(top_p=2.0)


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        SamplingParams(1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        SamplingParams(temprature=0.5)  # type: ignore[call-arg]


def test_explicit_fields_recorded_but_not_compared() -> None:
    p = SamplingParams(temperature=1.0, max_tokens=16)
    assert p.explicit_fields == {"temperature", "max_tokens"}
    # Same values as the defaults: equal and same hash, although the explicit record differs.
    assert p == SamplingParams() and hash(p) == hash(SamplingParams())
    assert "_explicit" not in {f.name for f in dataclasses.fields(p)}
    assert pickle.loads(pickle.dumps(p)).explicit_fields == p.explicit_fields


def test_replace_keeps_explicit_record() -> None:
    p = SamplingParams(temperature=0.3).replace(top_k=5)
    assert (p.temperature, p.top_k) == (0.3, 5)
    assert p.explicit_fields == {"temperature", "top_k"}


def test_from_generation_config_qwen25_vl() -> None:
    p = SamplingParams.from_generation_config(QWEN25_VL_GENERATION_CONFIG)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.1, 0.001, 1, 1.05)
    assert p.max_tokens == 16  # no max_new_tokens in the config: the SamplingParams default
    assert p.explicit_fields == {"temperature", "top_p", "top_k", "repetition_penalty"}


def test_from_generation_config_keys() -> None:
    p = SamplingParams.from_generation_config(
        {"do_sample": False, "temperature": 0.7, "max_new_tokens": 128, "top_k": None, "x": 1}
    )
    assert p.temperature == 0.0 and p.is_greedy  # do_sample false wins over temperature
    assert p.max_tokens == 128
    assert p.top_k == 0  # null ignored
    # Without do_sample the temperature is kept (vLLM), not transformers' greedy default.
    assert SamplingParams.from_generation_config({"temperature": 0.7}).temperature == 0.7
    assert SamplingParams.from_generation_config({"min_p": 0.05}).min_p == 0.05
    assert SamplingParams.from_generation_config({}) == SamplingParams()


def test_from_generation_config_overrides_win() -> None:
    p = SamplingParams.from_generation_config(
        QWEN25_VL_GENERATION_CONFIG, temperature=0.0, max_tokens=64, seed=3
    )
    assert (p.temperature, p.max_tokens, p.seed) == (0.0, 64, 3)
    assert (p.top_p, p.top_k, p.repetition_penalty) == (0.001, 1, 1.05)


def test_from_generation_config_errors() -> None:
    with pytest.raises(ConfigError, match="generation_config"):
        SamplingParams.from_generation_config({"top_p": 0.0})
    with pytest.raises(PromptError):
        SamplingParams.from_generation_config({"top_p": 0.5}, top_p=2.0)


def test_merged_with_defaults() -> None:
    defaults = SamplingParams.from_generation_config(QWEN25_VL_GENERATION_CONFIG)
    # LLM.chat(params=None): the checkpoint's defaults, unchanged.
    assert SamplingParams().merged_with_defaults(defaults) == defaults
    # Only the fields the user passed override the defaults.
    p = SamplingParams(temperature=0.7, max_tokens=100).merged_with_defaults(defaults)
    assert (p.temperature, p.max_tokens) == (0.7, 100)
    assert (p.top_p, p.top_k, p.repetition_penalty) == (0.001, 1, 1.05)
    # A value passed explicitly wins even when it equals the SamplingParams default.
    p = SamplingParams(top_k=0, top_p=1.0, repetition_penalty=1.0).merged_with_defaults(defaults)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.1, 1.0, 0, 1.0)
    assert p.explicit_fields == {"temperature", "top_p", "top_k", "repetition_penalty"}
    # No defaults: the params themselves.
    q = SamplingParams(seed=1)
    assert q.merged_with_defaults(None) is q
