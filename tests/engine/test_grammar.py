"""Structured outputs on the engine's sampler (``engine/grammar.py``, llguidance).

The worst case is a random-weight model: left free it writes noise. Constrained and sampled at
temperature 1 with many seeds, every reply to each of 30+ bounded schemas must parse and
validate (``jsonschema``, the independent judge) and end with ``stop`` inside ``max_tokens``.
Exactness: on the trained demo model, a constraint its free greedy answer already satisfies
changes nothing. Tool calls demanded by ``tool_choice`` always parse and validate.
"""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest

from qwenvl import LLM, SamplingParams
from qwenvl.engine.config import EngineConfig
from qwenvl.errors import PromptError
from qwenvl.structured import StructuredOutput
from qwenvl.tool_calls import parse_tool_calls

WORD = {"type": "string", "maxLength": 6}
SMALL = {"type": "integer", "minimum": -5, "maximum": 120}
BOX = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000}}
BOX = {**BOX, "minItems": 4, "maxItems": 4}

SCHEMAS: list[dict] = [
    {"type": "boolean"},
    {"type": "null"},
    SMALL,
    WORD,
    {"type": "string", "minLength": 2, "maxLength": 4},
    {"type": "string", "pattern": "^[a-z]{1,5}-[0-9]{2}$"},
    {"type": "string", "enum": ["red", "green", "blue"]},
    {"const": "fixed"},
    {"enum": [1, "two", None, True]},
    {"type": ["string", "null"], "maxLength": 3},
    {"anyOf": [SMALL, WORD]},
    {"oneOf": [{"type": "boolean"}, {"type": "null"}]},
    {"type": "array", "items": SMALL, "maxItems": 3},
    {"type": "array", "items": WORD, "minItems": 1, "maxItems": 2},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2, "maxItems": 4},
    BOX,
    {
        "type": "object",
        "properties": {"a": SMALL},
        "required": ["a"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"name": WORD, "age": SMALL},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "note": {"type": ["string", "null"], "maxLength": 4},
        },
        "required": ["ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"bbox_2d": BOX, "label": WORD},
        "required": ["bbox_2d", "label"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"bbox_2d": BOX, "label": WORD},
            "required": ["bbox_2d", "label"],
            "additionalProperties": False,
        },
        "maxItems": 2,
    },
    {
        "type": "object",
        "properties": {
            "point_2d": {"type": "array", "items": SMALL, "minItems": 2, "maxItems": 2},
            "label": WORD,
        },
        "required": ["point_2d", "label"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "outer": {
                "type": "object",
                "properties": {"inner": SMALL},
                "required": ["inner"],
                "additionalProperties": False,
            }
        },
        "required": ["outer"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "item": {
                "type": "object",
                "properties": {"id": SMALL},
                "required": ["id"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "first": {"$ref": "#/$defs/item"},
            "rest": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 2},
        },
        "required": ["first", "rest"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"kind": {"enum": ["click", "type"]}, "x": SMALL, "y": SMALL},
        "required": ["kind", "x", "y"],
        "additionalProperties": False,
    },
    {
        "anyOf": [
            {
                "type": "object",
                "properties": {"click": BOX},
                "required": ["click"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"text": WORD},
                "required": ["text"],
                "additionalProperties": False,
            },
        ]
    },
    {
        "type": "object",
        "properties": {"v": {"anyOf": [SMALL, {"type": "null"}]}},
        "required": ["v"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"x": {"const": 3}},
        "required": ["x"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "enum": ["x", "y", "z"]},
                "maxItems": 3,
            }
        },
        "required": ["tags"],
        "additionalProperties": False,
    },
    {"type": "object", "maxProperties": 0},
    {"type": "number", "minimum": 0, "maximum": 1},
    {
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
        "required": ["date"],
        "additionalProperties": False,
    },
]
SEEDS = range(4)
MAX_TOKENS = 96
PROMPT = [{"role": "user", "content": "Output the color and number of each box as JSON."}]


def constrained(llm: LLM, so: StructuredOutput, n: int = 1, **kw) -> list:
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=MAX_TOKENS, n=n, structured=so, **kw)
        for s in SEEDS
    ]
    return [o for r in llm.chat([PROMPT] * len(params), params) for o in r.outputs]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_every_reply_to_a_bounded_schema_parses_and_validates(family, llms):
    llm = llms(family)
    assert len(SCHEMAS) >= 30
    for schema in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(schema)
        so = StructuredOutput(json_schema=schema)
        outs = constrained(llm, so)
        first = SamplingParams(temperature=1.0, seed=SEEDS[0], max_tokens=MAX_TOKENS, structured=so)
        streamed = "".join(e.text for e in llm.stream_chat(PROMPT, first))
        assert streamed == outs[0].text
        for out in outs:
            assert out.finish_reason == "stop", (schema, out.text)
            jsonschema.validate(json.loads(out.text), schema)
            assert out.text == json.dumps(json.loads(out.text), ensure_ascii=False) or isinstance(
                json.loads(out.text), float
            )  # compact separators, no free whitespace


def test_json_object_regex_choice_and_lark(llms):
    llm = llms("qwen2_vl")
    # any object: unbounded, so noise may still be inside a string at max_tokens; every reply
    # that ends is an object
    outs = constrained(llm, StructuredOutput(json_object=True))
    assert "stop" in [o.finish_reason for o in outs]
    for out in outs:
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.text.startswith('{"')
    for out in constrained(llm, StructuredOutput(regex=r"[0-9]{3}-[a-z]{2,4}")):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", out.text) and out.finish_reason == "stop"
    for out in constrained(llm, StructuredOutput(choice=("yes", "no", "maybe not"))):
        assert out.text in ("yes", "no", "maybe not") and out.finish_reason == "stop"
    lark = 'start: "move " DIR " " NUM\nDIR: "left" | "right"\nNUM: /[1-9]/'
    for out in constrained(llm, StructuredOutput(grammar=lark)):
        assert re.fullmatch(r"move (left|right) [1-9]", out.text), out.text


def test_logprobs_are_those_of_the_constrained_distribution(llms):
    llm = llms("qwen2_vl")
    so = StructuredOutput(choice=("yes", "no"))
    out = llm.chat(PROMPT, SamplingParams(temperature=0, max_tokens=4, logprobs=20, structured=so))
    first = out[0].outputs[0].logprobs[0]
    texts = {llm.tokenizer.decode([t]) for t in first}
    assert all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
    assert math.isclose(sum(math.exp(v) for v in first.values()), 1.0, rel_tol=1e-4)


def test_a_constraint_the_free_answer_meets_changes_nothing():
    """The trained demo model's free greedy answer to its README question already has the
    ``colour count, ...`` rows form: constrained to that form, the answer is the same token for
    token (the mask never removes the token the model would have chosen)."""
    from qwenvl import demo

    llm = LLM()
    question = "Output the color and number of each box."
    image = {"type": "image", "image": str(demo.example_image_path())}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": question}]}]
    free = llm.chat(messages, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    row = r"[a-z]+ [0-9]+(, [a-z]+ [0-9]+)*"
    form = f"{row}(\\n{row})*"
    assert free.finish_reason == "stop" and re.fullmatch(form, free.text), free.text
    so = StructuredOutput(regex=form)
    held = llm.chat(messages, SamplingParams(temperature=0, max_tokens=64, structured=so))
    assert held[0].outputs[0].token_ids == free.token_ids
    assert held[0].outputs[0].text == free.text


def test_constrained_under_preemption_and_prefix_caching(checkpoints, llms):
    """A KV cache too small for the batch preempts (and re-admits through the prefix cache)
    constrained sequences; their replies are the same as with room to spare."""
    tight = LLM(
        checkpoints("qwen2_vl"),
        dtype="float32",
        engine_config=EngineConfig(num_kv_blocks=36, block_size=4, max_num_batched_tokens=16),
    )
    so = StructuredOutput(json_schema=SCHEMAS[19])  # a box and its label
    outs = constrained(tight, so, n=2)
    assert tight.engine.stats["preemptions"] > 0 and tight.engine.stats["prefix_cache_hits"] > 0
    roomy = constrained(llms("qwen2_vl"), so, n=2)
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    for out in outs:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMAS[19])


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "click",
            "parameters": {
                "type": "object",
                "properties": {"x": SMALL, "y": SMALL},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "type_text",
            "parameters": {
                "type": "object",
                "properties": {"text": WORD},
                "required": ["text"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "type_text"}}]
)
def test_a_demanded_tool_call_always_parses_and_validates(choice, llms):
    llm = llms("qwen2_vl")
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=MAX_TOKENS) for s in SEEDS]
    results = llm.chat([PROMPT] * len(params), params, tools=TOOLS, tool_choice=choice)
    for r in results:
        out = r.outputs[0]
        content, calls = parse_tool_calls(out.text)
        assert out.finish_reason == "stop" and len(calls) == 1 and not content.strip(), out.text
        call = calls[0]
        if isinstance(choice, dict):
            assert call["name"] == "type_text"
        params_schema = next(
            t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call["name"]
        )
        jsonschema.validate(call["arguments"], params_schema)
        assert [c.name for c in out.tool_calls] == [call["name"]]


def test_refusals_name_what_is_wrong(llms):
    llm = llms("qwen2_vl")
    for so, words in [
        (StructuredOutput(json_schema={"type": "array", "uniqueItems": True}), "uniqueItems"),
        (StructuredOutput(json_schema={"not": {"type": "string"}}), "not"),
        (StructuredOutput(regex="[unclosed"), "regex"),
        (StructuredOutput(grammar="start: undefined_rule"), "grammar"),
    ]:
        with pytest.raises(PromptError, match=words):
            llm.chat(PROMPT, SamplingParams(max_tokens=4, structured=so))
    with pytest.raises(PromptError, match="exactly one"):
        StructuredOutput(regex="a", choice=("a",))
    with pytest.raises(PromptError, match="not valid JSON"):
        StructuredOutput(json_schema="{nope")


def test_each_constraint_compiles_once(llms):
    llm = llms("qwen2_vl")
    grammars = llm.engine.grammars
    schema = {"type": "object", "properties": {"q": WORD}, "required": ["q"]}
    before = grammars.cached
    for _ in range(3):
        constrained(llm, StructuredOutput(json_schema=dict(schema)))
    assert grammars.cached == before + 1
