"""Structured outputs through the server, with the clients people use: the openai client
(``response_format``, ``chat.completions.parse`` with a pydantic model, streaming), vLLM's body
fields through ``extra_body``, LangChain's ``with_structured_output``, litellm's JSON mode, and
``tool_choice`` that demands a call. The served model is a tiny random one (free, it writes
noise), so every valid reply is the constraint's doing; ``jsonschema`` and pydantic judge."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field
from server_helpers import API_KEY, MODEL, Running

MESSAGES = [{"role": "user", "content": "Output the color and number of each box."}]
BOX_SCHEMA = {
    "type": "object",
    "properties": {
        "bbox_2d": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 1000},
            "minItems": 4,
            "maxItems": 4,
        },
        "label": {"type": "string", "maxLength": 6},
    },
    "required": ["bbox_2d", "label"],
    "additionalProperties": False,
}


class Box(BaseModel):
    colour: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=99)


def create(server: Running, **kw: Any) -> Any:
    kw = {"max_tokens": 96, "temperature": 1.0, **kw}
    return server.client().chat.completions.create(model=MODEL, messages=MESSAGES, **kw)


@pytest.mark.parametrize("seed", range(3))
def test_response_format_json_schema_streamed_and_not(server, seed):
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "box", "schema": BOX_SCHEMA, "strict": True},
    }
    full = create(server, response_format=fmt, seed=seed)
    assert full.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(full.choices[0].message.content), BOX_SCHEMA)
    chunks = list(create(server, response_format=fmt, seed=seed, stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # the JSON arrives as it is produced
    assert "".join(pieces) == full.choices[0].message.content


def test_json_object_mode_and_parse_with_a_pydantic_model(server):
    # any object is unbounded (noise may stay inside a string up to max_tokens): every reply
    # that ends is an object
    replies = [create(server, response_format={"type": "json_object"}, seed=s) for s in range(4)]
    ended = [r.choices[0].message.content for r in replies if r.choices[0].finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(t), dict) for t in ended)
    for seed in range(3):
        parsed = server.client().chat.completions.parse(
            model=MODEL, messages=MESSAGES, response_format=Box, seed=seed, max_tokens=64
        )
        assert isinstance(parsed.choices[0].message.parsed, Box)


def test_vllm_body_fields(server):
    cases = [
        ({"structured_outputs": {"choice": ["cat", "dog"]}}, lambda t: t in ("cat", "dog")),
        (
            {"structured_outputs": {"regex": "[a-c]{2}-[0-9]"}},
            lambda t: re.fullmatch("[a-c]{2}-[0-9]", t),
        ),
        (
            {"structured_outputs": {"json": BOX_SCHEMA}},
            lambda t: jsonschema.validate(json.loads(t), BOX_SCHEMA) is None,
        ),
        (
            {"guided_json": BOX_SCHEMA},
            lambda t: jsonschema.validate(json.loads(t), BOX_SCHEMA) is None,
        ),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"guided_regex": "[0-9]{3}"}, lambda t: re.fullmatch("[0-9]{3}", t)),
        (
            {"guided_grammar": 'start: "go " DIR\nDIR: "up" | "down"'},
            lambda t: t in ("go up", "go down"),
        ),
    ]
    for body, ok in cases:
        reply = create(server, extra_body=body, seed=1)
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop" and ok(text), (body, text)
    completion = server.client().completions.create(
        model=MODEL, prompt="The answer:", max_tokens=16, extra_body={"guided_regex": "[xy]{3}"}
    )
    assert re.fullmatch("[xy]{3}", completion.choices[0].text)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "set_box",
            "description": "Record a box.",
            "parameters": BOX_SCHEMA,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "done",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    },
]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_always_calls_with_valid_arguments(server, stream):
    for seed in range(3):
        reply = create(server, tools=TOOLS, tool_choice="required", seed=seed, stream=stream)
        if stream:
            chunks = list(reply)
            calls: dict[int, dict[str, str]] = {}
            for c in chunks:
                for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                    got = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                    got["name"] += tc.function.name or ""
                    got["arguments"] += tc.function.arguments or ""
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            made = list(calls.values())
        else:
            finish = reply.choices[0].finish_reason
            made = [
                {"name": t.function.name, "arguments": t.function.arguments}
                for t in reply.choices[0].message.tool_calls
            ]
        assert finish == "tool_calls" and len(made) == 1, made
        schema = next(
            t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == made[0]["name"]
        )
        jsonschema.validate(json.loads(made[0]["arguments"]), schema)
    named = create(
        server,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "set_box"}},
        seed=5,
    )
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "set_box"
    jsonschema.validate(json.loads(call.function.arguments), BOX_SCHEMA)


def test_refusals_are_400s_that_name_the_problem(server):
    url = f"{server.base_url}/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    base = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8}
    cases = [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "uniqueItems",
        ),
        ({"guided_regex": "[oops"}, "regex"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "one way only"),
        ({"response_format": {"type": "json_schema"}}, "json_schema is required"),
        ({"structured_outputs": {"choice": []}}, "at least one"),
    ]
    for extra, words in cases:
        r = httpx.post(url, json={**base, **extra}, headers=headers, timeout=30)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (extra, r.text)


def test_langchain_with_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(
        model=MODEL,
        base_url=server.base_url,
        api_key=API_KEY,
        max_tokens=64,
        temperature=1.0,
        max_retries=0,
    )
    for seed in range(2):
        box = chat.bind(seed=seed).with_structured_output(Box).invoke("Which box?")
        assert isinstance(box, Box)


def test_litellm_json_mode(server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    litellm = pytest.importorskip("litellm")
    reply = litellm.completion(
        model=f"openai/{MODEL}",
        api_base=server.base_url,
        api_key=API_KEY,
        messages=MESSAGES,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "box", "schema": BOX_SCHEMA},
        },
        max_tokens=96,
        seed=2,
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), BOX_SCHEMA)
