"""``POST /v1/responses`` with the real openai client and LangChain (``use_responses_api``):
the same replies the chat endpoint gives for the same conversation, streamed as the Responses
events, function tools round-tripping through ``function_call`` / ``function_call_output``."""

from __future__ import annotations

import json

import jsonschema
import pytest
from server_helpers import API_KEY, MODEL, data_uri, png_bytes

CLICK = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["x"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "name": "click", "parameters": CLICK}]


def test_text_and_image_answer_as_the_chat_endpoint(server):
    client = server.client()
    image = data_uri(png_bytes())
    content = [{"type": "input_text", "text": "What?"}, {"type": "input_image", "image_url": image}]
    got = client.responses.create(
        model=MODEL,
        instructions="Be brief.",
        input=[{"role": "user", "content": content}],
        max_output_tokens=6,
        temperature=0,
    )
    chat_content = [
        {"type": "text", "text": "What?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": chat_content},
    ]
    want = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0
    )
    assert got.output_text == want.choices[0].message.content
    assert got.usage.input_tokens == want.usage.prompt_tokens
    assert got.usage.output_tokens == want.usage.completion_tokens
    assert got.status == "incomplete" and got.incomplete_details.reason == "max_output_tokens"
    stream = client.responses.create(
        model=MODEL,
        instructions="Be brief.",
        input=[{"role": "user", "content": content}],
        max_output_tokens=6,
        temperature=0,
        stream=True,
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete" and "response.output_text.delta" in kinds
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == got.output_text == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_tool_round_trip(server, stream):
    client = server.client()
    first = client.responses.create(
        model=MODEL,
        input="Click it.",
        tools=TOOLS,
        tool_choice="required",
        max_output_tokens=64,
        stream=stream,
    )
    if stream:
        events = list(first)
        assert "response.function_call_arguments.done" in [e.type for e in events]
        first = events[-1].response
    (call,) = [o for o in first.output if o.type == "function_call"]
    assert call.name == "click"
    jsonschema.validate(json.loads(call.arguments), CLICK)
    history = [
        {"role": "user", "content": "Click it."},
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
        },
        {"type": "function_call_output", "call_id": call.call_id, "output": "clicked"},
    ]
    second = client.responses.create(
        model=MODEL, input=history, tools=TOOLS, max_output_tokens=4, temperature=0
    )
    fn = {"name": "click", "arguments": call.arguments}
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Click it."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.call_id, "type": "function", "function": fn}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "clicked"},
        ],
        tools=[{"type": "function", "function": {"name": "click", "parameters": CLICK}}],
        max_tokens=4,
        temperature=0,
    )  # fmt: skip
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == (chat.choices[0].message.content or "")
    # OpenAI's documented pattern: the response's own output objects go back into the input
    # (the SDK serialises every field of them, ``status``, ``async_`` and ``caller`` included)
    again = [{"role": "user", "content": "Click it."}, *first.output, history[-1]]
    same = client.responses.create(
        model=MODEL, input=again, tools=TOOLS, max_output_tokens=4, temperature=0
    )
    assert same.usage.input_tokens == second.usage.input_tokens
    assert same.output_text == second.output_text
    dumped = [{"role": "user", "content": "Click it."}, call.model_dump(), history[-1]]
    assert (
        client.responses.create(
            model=MODEL, input=dumped, tools=TOOLS, max_output_tokens=4, temperature=0
        ).output_text
        == second.output_text
    )


def test_structured_text_format_and_refusals(server):
    client = server.client()
    fmt = {"format": {"type": "json_schema", "name": "click", "schema": CLICK, "strict": True}}
    for temperature in (0.0, 1.0):
        r = client.responses.create(
            model=MODEL, input="Where?", text=fmt, max_output_tokens=32, temperature=temperature
        )
        jsonschema.validate(json.loads(r.output_text), CLICK)
    import openai

    with pytest.raises(openai.BadRequestError, match="send the whole conversation"):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError, match="reasoning"):
        client.responses.create(model=MODEL, input="x", reasoning={"effort": "low"})


def test_langchain_over_the_responses_api(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(
        model=MODEL,
        base_url=server.base_url,
        api_key=API_KEY,
        use_responses_api=True,
        max_tokens=4,
        temperature=0,
        max_retries=0,
    )
    reply = chat.invoke("Hello there")
    direct = server.client().responses.create(
        model=MODEL, input="Hello there", max_output_tokens=4, temperature=0
    )
    assert reply.text == direct.output_text
