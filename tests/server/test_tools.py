"""Tool calls: the streaming parser, and the server's tool_calls path with fixed replies."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from server_helpers import MODEL, fix_server_text

from qwenvl.server.tool_parser import ToolCallStream
from qwenvl.tool_calls import parse_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
TEXTS = [
    "plain text, no call",
    "a < b and <tool but no call <",
    "Let me check.\n" + CALL,
    CALL + "\n" + CALL.replace("Paris", "Rome"),
    "A\n" + CALL + "\nB",
    'x <tool_call>{"not json</tool_call> y',
    '<tool_call>\n{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}',  # cut off
    "<tool_call>never closed, not json",
    '<tool_call>{"name": "f", "arguments": {"s": "</tool"}}</tool_call>',
]


def _run(text: str, sizes: list[int]) -> tuple[str, list[dict[str, Any]], list[str]]:
    stream = ToolCallStream()
    content, calls, pieces, pos = "", [], [], 0
    for size in sizes:
        if pos >= len(text):
            break
        c, new = stream.feed(text[pos : pos + size])
        pieces.append(c)
        content += c
        calls += new
        pos += size
    c, new = stream.feed(text[pos:])
    content += c
    calls += new
    c, new = stream.finish()
    content += c
    calls += new
    return content, [{"name": t.name, "arguments": t.arguments} for t in calls], pieces


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_parser_matches_whole_text_parser(text: str) -> None:
    rng = random.Random(0)
    want_content, want_calls = parse_tool_calls(text)
    for _ in range(40):
        sizes = [rng.randint(1, 6) for _ in range(len(text))]
        content, calls, pieces = _run(text, sizes)
        assert calls == want_calls
        assert content == want_content
        if want_calls:  # no delta ever shows part of a tag of a real call
            assert not any("<tool" in p or "</tool" in p for p in pieces)


def test_streaming_parser_one_char_at_a_time_never_leaks_a_half_tag() -> None:
    content, calls, pieces = _run("Sure. " + CALL, [1] * 200)
    assert content == "Sure."
    assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert all("<" not in p for p in pieces)


def test_tool_calls_non_streamed(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fix_server_text(monkeypatch, server, CALL)
    r = server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        max_tokens=2,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_calls_streamed(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fix_server_text(monkeypatch, server, "Checking.\n" + CALL, piece=2)
    stream = server.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        tool_choice="auto",
        max_tokens=2,
        stream=True,
    )
    content, calls, finish = "", {}, None
    for ch in stream:
        for c in ch.choices:
            assert "<" not in (c.delta.content or "")
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert content == "Checking."
    assert calls == {0: {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert finish == "tool_calls"


def test_tool_choice_none_and_named(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = fix_server_text(monkeypatch, server, CALL)
    client = server.client()
    msgs = [{"role": "user", "content": "Weather?"}]
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=2
    )
    assert r.choices[0].message.tool_calls in (None, [])  # not parsed: the text stays content
    assert r.choices[0].message.content == CALL
    assert "get_weather" not in prompts[-1].text  # tools are not offered either
    # a named function: the reply is constrained to that call (tests/server/test_structured.py
    # checks the constraint on a real model; here the engine's text is fixed)
    oslo = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    fix_server_text(monkeypatch, server, oslo)
    r = client.chat.completions.create(
        model=MODEL,
        messages=msgs,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=2,
    )
    (call,) = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Oslo"},
    )


def test_tool_result_round_trip(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    client = server.client()
    fix_server_text(monkeypatch, server, CALL)
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, max_tokens=2
    )
    assistant = first.choices[0].message
    messages.append(assistant)  # the client's own message object, as the OpenAI docs do
    messages.append(
        {"role": "tool", "tool_call_id": assistant.tool_calls[0].id, "content": "22 C, sunny"}
    )
    prompts = fix_server_text(monkeypatch, server, "It is 22 C and sunny in Paris.")
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, max_tokens=2
    )
    assert second.choices[0].message.content == "It is 22 C and sunny in Paris."
    assert second.choices[0].finish_reason == "stop"
    text = prompts[-1].text
    assert '"name": "get_weather"' in text and "<tool_response>\n22 C, sunny" in text
