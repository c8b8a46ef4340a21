"""Function calling end to end: ``LLM.chat(..., tools=[...])`` fills ``CompletionOutput.tool_calls``
and ``.content``; multi-turn histories with tool calls and results render as Qwen's template does
(reference notes 4.3), on the released VL template."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest

from fixed_output import fix_output_text
from qwenvl import SamplingParams
from qwenvl.processing.chat_template import render_chat
from qwenvl.tool_calls import ToolCall

SHARED_TEMPLATE = Path("/work/shared/data/qwen2_vl_chat_template.jinja")
PACKAGED_TEMPLATE = files("qwenvl").joinpath("data/qwen2_vl_chat_template.jinja").read_text()

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
REPLY = (
    "Let me check both.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"東京\\"}"}\n</tool_call>'
)


def released_template() -> str:
    if SHARED_TEMPLATE.is_file():
        text = SHARED_TEMPLATE.read_text()
        assert text.strip() == PACKAGED_TEMPLATE.strip()
        return text
    return PACKAGED_TEMPLATE


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_chat_with_tools_returns_tool_calls(family, llms, monkeypatch):
    llm = llms(family)
    fix_output_text(monkeypatch, REPLY)
    messages = [{"role": "user", "content": "Weather in Paris and Tokyo?"}]
    params = SamplingParams(temperature=0, max_tokens=2)
    (result,) = llm.chat(messages, params, tools=[WEATHER])
    assert "# Tools" in result.prompt and '"name": "get_weather"' in result.prompt
    out = result.outputs[0]
    assert out.text == REPLY
    assert out.content == "Let me check both."
    assert [(c.name, c.arguments) for c in out.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "東京"}),
    ]
    assert all(isinstance(c, ToolCall) and c.id.startswith("call_") for c in out.tool_calls)
    wire = out.tool_calls[1].to_openai()
    assert wire["type"] == "function" and json.loads(wire["function"]["arguments"]) == {
        "city": "東京"
    }

    # The reply goes back into the history in OpenAI shape, with the tool results.
    history = [
        *messages,
        {
            "role": "assistant",
            "content": out.content,
            "tool_calls": [c.to_openai() for c in out.tool_calls],
        },
        {"role": "tool", "content": '{"temp": 20}'},
        {"role": "tool", "content": '{"temp": 25}'},
    ]
    (again,) = llm.chat(history, params, tools=[WEATHER])
    assert again.prompt.endswith(
        "<|im_start|>assistant\nLet me check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 20}\n</tool_response>\n'
        '<tool_response>\n{"temp": 25}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    )


def test_chat_without_tools_leaves_tool_fields_empty(llms, monkeypatch):
    llm = llms("qwen2_5_vl")
    fix_output_text(monkeypatch, REPLY)
    (result,) = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1))
    assert result.outputs[0].tool_calls is None and result.outputs[0].content is None


def test_plain_reply_with_tools_has_content_only(llms, monkeypatch):
    llm = llms("qwen2_vl")
    fix_output_text(monkeypatch, "It is sunny.")
    (result,) = llm.chat(
        [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1), tools=[WEATHER]
    )
    assert result.outputs[0].tool_calls is None
    assert result.outputs[0].content == "It is sunny."


def test_multi_turn_tool_prompt_on_the_released_template():
    """Hand-written from reference notes 4.3: the tools block in the system turn, assistant calls
    as <tool_call> blocks after the content, consecutive tool results merged into one user turn
    of <tool_response> blocks; arguments given as a JSON string or a dict render the same."""
    template = released_template()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Go"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "mobile_use",
                        "arguments": '{"action": "click", "coordinate": [935, 406]}',
                    },
                }
            ],
        },
        {"role": "tool", "content": "ok"},
        {
            "role": "assistant",
            "content": "Typing now.",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {
                        "name": "mobile_use",
                        "arguments": {"action": "type", "text": "hi"},
                    },
                }
            ],
        },
        {"role": "tool", "content": "typed"},
        {"role": "tool", "content": "screen changed"},
    ]
    tool = {"type": "function", "function": {"name": "mobile_use", "description": "Use a phone."}}
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "mobile_use", "description": "Use a phone."}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Go<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "mobile_use", "arguments": {"action": "click", "coordinate": [935, 406]}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nTyping now.\n<tool_call>\n"
        '{"name": "mobile_use", "arguments": {"action": "type", "text": "hi"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\ntyped\n</tool_response>\n"
        "<tool_response>\nscreen changed\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(template, messages, tools=[tool]) == expected
