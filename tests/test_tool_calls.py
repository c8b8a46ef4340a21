"""Tests for qwenvl.tool_calls: parsing Hermes-style <tool_call> blocks out of generated text."""

from __future__ import annotations

import json

import pytest

from qwenvl.outputs import CompletionOutput
from qwenvl.tool_calls import (
    ToolCall,
    attach_tool_calls,
    extract_tool_calls,
    format_tool_call,
    parse_tool_calls,
)

CALL = '<tool_call>\n{"name": "click", "arguments": {"x": 1, "y": 2}}\n</tool_call>'


def test_plain_text_is_unchanged() -> None:
    text = "  Just an answer.\n"
    assert parse_tool_calls(text) == (text, [])
    assert parse_tool_calls("") == ("", [])


def test_single_call_with_content() -> None:
    content, calls = parse_tool_calls("I'll click it.\n" + CALL)
    assert content == "I'll click it."
    assert calls == [{"name": "click", "arguments": {"x": 1, "y": 2}}]


def test_call_only_gives_empty_content() -> None:
    assert parse_tool_calls(CALL) == ("", [{"name": "click", "arguments": {"x": 1, "y": 2}}])


def test_multiple_calls_and_whitespace() -> None:
    text = (
        '<tool_call>{"name":"a","arguments":{}}</tool_call>\n'
        '<tool_call>  \n\t{"name": "b", "arguments": {"k": "中文"}}  \n</tool_call>\n\n'
        "<tool_call>\n"
        '{\n  "name": "c",\n  "arguments": {"n": [1, 2]}\n}\n'
        "</tool_call>\n"
    )
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert [c["name"] for c in calls] == ["a", "b", "c"]
    assert calls[1]["arguments"] == {"k": "中文"} and calls[2]["arguments"] == {"n": [1, 2]}


def test_prose_between_calls_is_kept() -> None:
    content, calls = parse_tool_calls(f"First.\n{CALL}\nThen.\n{CALL}")
    assert content == "First.\nThen." and len(calls) == 2


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
        '<tool_call>\n["name", "f"]\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": "{oops"}\n</tool_call>',
    ],
)
def test_malformed_block_stays_in_content(bad: str) -> None:
    assert parse_tool_calls(bad) == (bad, [])
    content, calls = parse_tool_calls(f"{bad}\n{CALL}")
    assert content == bad and [c["name"] for c in calls] == ["click"]


def test_unclosed_block_does_not_swallow_the_next() -> None:
    text = '<tool_call>\n{"name": "cut\n' + CALL
    content, calls = parse_tool_calls(text)
    assert content == '<tool_call>\n{"name": "cut'
    assert [c["name"] for c in calls] == ["click"]
    truncated = 'Sure.\n<tool_call>\n{"name": "f", "argu'
    assert parse_tool_calls(truncated) == (truncated, [])


def test_argument_variants() -> None:
    text = (
        '<tool_call>{"name": "s", "arguments": "{\\"q\\": 1}"}</tool_call>'
        '<tool_call>{"name": "m"}</tool_call>'
        '<tool_call>{"name": "n", "arguments": null}</tool_call>'
    )
    _, calls = parse_tool_calls(text)
    assert calls == [
        {"name": "s", "arguments": {"q": 1}},
        {"name": "m", "arguments": {}},
        {"name": "n", "arguments": {}},
    ]


def test_format_round_trip() -> None:
    block = format_tool_call("search", {"query": "東京 weather", "n": 3})
    assert block == (
        '<tool_call>\n{"name": "search", "arguments": '
        '{"query": "東京 weather", "n": 3}}\n</tool_call>'
    )
    assert parse_tool_calls(block) == (
        "",
        [{"name": "search", "arguments": {"query": "東京 weather", "n": 3}}],
    )


# --- structured results: ToolCall, extract_tool_calls, attach_tool_calls ----------------------


def test_final_block_missing_only_its_closing_tag_is_a_call() -> None:
    text = 'Clicking.\n<tool_call>\n{"name": "click", "arguments": {"x": 1}}\n'
    assert parse_tool_calls(text) == ("Clicking.", [{"name": "click", "arguments": {"x": 1}}])
    # Followed by a closed block it is not the last one: it stays text.
    both = '<tool_call>\n{"name": "a", "arguments": {}}\n' + CALL
    assert parse_tool_calls(both)[0].startswith("<tool_call>")


def test_tool_call_to_openai() -> None:
    call = ToolCall("search", {"query": "東京", "n": 2})
    assert call.id.startswith("call_") and len(call.id) == 29
    assert ToolCall("x").id != call.id and ToolCall("x").arguments == {}
    wire = call.to_openai()
    assert wire == {
        "id": call.id,
        "type": "function",
        "function": {"name": "search", "arguments": '{"query": "東京", "n": 2}'},
    }
    assert json.loads(wire["function"]["arguments"]) == call.arguments


def test_extract_tool_calls_content_none_when_only_calls() -> None:
    content, calls = extract_tool_calls(CALL)
    assert content is None
    assert [(c.name, c.arguments) for c in calls] == [("click", {"x": 1, "y": 2})]
    assert extract_tool_calls("just text") == ("just text", [])
    assert extract_tool_calls("  \n") == (None, [])


def test_attach_tool_calls_fills_outputs() -> None:
    outs = [
        CompletionOutput(0, f"Sure.\n{CALL}\n{CALL}", [1]),
        CompletionOutput(1, "No tool needed.", [2]),
        CompletionOutput(2, "<tool_call>\n{broken}\n</tool_call>", [3]),
    ]
    attach_tool_calls(outs, [{"name": "click"}])
    assert outs[0].content == "Sure." and [c.name for c in outs[0].tool_calls] == ["click"] * 2
    assert outs[0].tool_calls[0].id != outs[0].tool_calls[1].id
    assert outs[1].content == "No tool needed." and outs[1].tool_calls is None
    assert outs[2].content == outs[2].text and outs[2].tool_calls is None
    fresh = [CompletionOutput(0, CALL, [1])]
    attach_tool_calls(fresh, None)  # no tools offered: nothing parsed
    assert fresh[0].tool_calls is None and fresh[0].content is None
