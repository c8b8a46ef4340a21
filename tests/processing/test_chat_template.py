"""Tests for qwenvl.processing.chat_template: parity with transformers' apply_chat_template on the
released Qwen2-VL template, template loading, tool support and validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwenvl.errors import ConfigError, PromptError
from qwenvl.processing.chat_template import (
    DEFAULT_SYSTEM_PROMPT,
    load_chat_template,
    render_chat,
)
from qwenvl.tokenizer import save_tokenizer_files, train_qwen_style_tokenizer
from qwenvl.tool_calls import parse_tool_calls

# The released Qwen2-VL-Instruct template (chat_template.json), verbatim.
VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHARED_TEMPLATE_FILE = Path("/work/shared/data/qwen2_vl_chat_template.jinja")

# Qwen2.5-Instruct's text template (it has the tools branch the VL template lacks); used as an
# oracle for our tool rewriting. Jinja reads the "\n" escapes inside its string literals.
QWEN25_TEXT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and " }}
    {{- "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n" }}
    {{- "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501

IMAGE = {"type": "image", "image": "file:///tmp/a.png"}
IMAGE_URL = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
VIDEO = {"type": "video", "video": "file:///tmp/v.mp4"}

CONVERSATIONS = {
    "text": [{"role": "user", "content": "Hi there"}],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ],
    "multi_turn": [
        {"role": "user", "content": [{"type": "text", "text": "Who are you?"}]},
        {"role": "assistant", "content": "A model."},
        {"role": "user", "content": "And <b>now</b> & 'then'?"},
    ],
    "media": [
        {"role": "system", "content": "Look carefully."},
        {
            "role": "user",
            "content": [IMAGE, IMAGE_URL, VIDEO, {"type": "text", "text": "Compare these."}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, IMAGE, VIDEO]},
    ],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_FN = {"name": "get_time", "description": "Local time", "parameters": {"type": "object"}}


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("tok")
    tok = train_qwen_style_tokenizer(["hello world", "你好"], 300)
    save_tokenizer_files(tok, out, chat_template=None)
    return transformers.AutoTokenizer.from_pretrained(str(out))


def _hf_render(hf_tok: Any, template: str, messages: list[dict], **kwargs: Any) -> str:
    return hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=template, **kwargs
    )


# ---------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.skipif(not SHARED_TEMPLATE_FILE.is_file(), reason="team notes not present")
def test_embedded_template_is_the_released_one() -> None:
    assert SHARED_TEMPLATE_FILE.read_text(encoding="utf-8") == VL_TEMPLATE


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_vision_id", [False, True])
def test_matches_transformers(hf_tok: Any, name: str, add_vision_id: bool) -> None:
    messages = CONVERSATIONS[name]
    ours = render_chat(VL_TEMPLATE, messages, add_vision_id=add_vision_id)
    assert ours == _hf_render(hf_tok, VL_TEMPLATE, messages, add_vision_id=add_vision_id)


def test_documented_example() -> None:
    messages = [
        {
            "role": "user",
            "content": [IMAGE, IMAGE_URL, VIDEO, {"type": "text", "text": "Compare."}],
        },
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": "Thanks"},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>Compare.<|im_end|>\n"
        "<|im_start|>assistant\nThey differ.<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(VL_TEMPLATE, messages, add_vision_id=True) == expected
    no_prompt = render_chat(VL_TEMPLATE, messages, add_vision_id=True, add_generation_prompt=False)
    assert no_prompt == expected.removesuffix("<|im_start|>assistant\n")


def test_non_json_objects_render_like_transformers(hf_tok: Any) -> None:
    class FakeImage:
        def save(self, path: str) -> None:  # must never be reachable from a template
            raise AssertionError

    messages = [{"role": "user", "content": [{"type": "image", "image": FakeImage()}]}]
    ours = render_chat(VL_TEMPLATE, messages)
    assert ours == _hf_render(hf_tok, VL_TEMPLATE, messages)
    assert "<|image_pad|>" in ours


def test_environment_like_transformers(hf_tok: Any) -> None:
    # trim_blocks/lstrip_blocks, the non-escaping tojson filter, loop controls, extra variables.
    template = (
        "{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "{{ m | tojson }}|{{ m | tojson(indent=2) }}|{{ bos_word }}\n{% endfor %}"
    )
    messages = [{"role": "user", "content": "<a href='x'>&amp; 中</a>"}] * 3
    ours = render_chat(template, messages, bos_word="BOS")
    assert ours == _hf_render(hf_tok, template, messages, bos_word="BOS")
    assert "<a href='x'>" in ours and "中" in ours


def test_generation_tag_is_accepted(hf_tok: Any) -> None:
    template = (
        "{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
    )
    messages = [{"role": "assistant", "content": "x"}]
    assert render_chat(template, messages) == _hf_render(hf_tok, template, messages) == "[x]"


def test_template_is_compiled_once() -> None:
    from qwenvl.processing import chat_template as ct

    ct._compile.cache_clear()
    render_chat(VL_TEMPLATE, CONVERSATIONS["text"])
    render_chat(VL_TEMPLATE, CONVERSATIONS["media"])
    info = ct._compile.cache_info()
    assert info.misses == 1 and info.hits == 1


def test_template_errors() -> None:
    with pytest.raises(PromptError, match="no images"):
        render_chat("{{ raise_exception('no images') }}", CONVERSATIONS["text"])
    with pytest.raises(ConfigError):
        render_chat("{% for %}", CONVERSATIONS["text"])
    with pytest.raises(PromptError):  # sandboxed: no route to Python internals
        render_chat("{{ messages.__class__.__mro__ }}", CONVERSATIONS["text"])
    with pytest.raises(PromptError):
        render_chat("{% set ns = namespace(_x=1) %}", CONVERSATIONS["text"])


# ---------------------------------------------------------------------------------------------
# Loading


def test_load_priority(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chat_template.json.*chat_template.jinja"):
        load_chat_template(tmp_path)
    cfg = {"eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError):
        load_chat_template(tmp_path)
    cfg["chat_template"] = [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": "D"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_chat_template(tmp_path) == "D"
    cfg["chat_template"] = "C"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_chat_template(tmp_path) == "C"
    (tmp_path / "chat_template.jinja").write_text("J\n")
    assert load_chat_template(tmp_path) == "J\n"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": VL_TEMPLATE}))
    assert load_chat_template(tmp_path) == VL_TEMPLATE


def test_load_errors(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"x": 1}]}))
    with pytest.raises(ConfigError, match="default"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.json").write_text("{broken")
    with pytest.raises(ConfigError, match="chat_template.json"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"template": "x"}))
    with pytest.raises(ConfigError):
        load_chat_template(tmp_path)


# ---------------------------------------------------------------------------------------------
# Tools


def test_tools_block_hand_written() -> None:
    messages = [{"role": "user", "content": "Weather in 東京?"}]
    ours = render_chat(VL_TEMPLATE, messages, tools=[WEATHER_TOOL, TIME_FN])
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": '
        '"Current weather in a city", "parameters": {"type": "object", "properties": '
        '{"city": {"type": "string"}}, "required": ["city"]}}}\n'
        '{"type": "function", "function": {"name": "get_time", "description": "Local time", '
        '"parameters": {"type": "object"}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in 東京?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ours == expected
    assert DEFAULT_SYSTEM_PROMPT == "You are a helpful assistant."


def test_tools_appended_to_given_system(hf_tok: Any) -> None:
    messages = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Hi"}]
    ours = render_chat(VL_TEMPLATE, messages, tools=[WEATHER_TOOL])
    assert ours.startswith("<|im_start|>system\nBe exact.\n\n# Tools\n\n")
    assert ours.count("<|im_start|>system") == 1
    assert render_chat(VL_TEMPLATE, messages, tools=[]) == render_chat(VL_TEMPLATE, messages)
    # List-content system messages get the block as a trailing text item.
    as_list = [{"role": "system", "content": [{"type": "text", "text": "Be exact."}]}, messages[1]]
    assert render_chat(VL_TEMPLATE, as_list, tools=[WEATHER_TOOL]) == ours


AGENT_TURNS: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris and 東京?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            },
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "東京"}},
            },
        ],
    },
    {"role": "tool", "content": '{"temp": 20}'},
    {"role": "tool", "content": '{"temp": 25}'},
    {
        "role": "assistant",
        "content": "Let me check the time too.",
        "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": {}}}],
    },
    {"role": "tool", "content": "12:00"},
    {"role": "assistant", "content": "Paris 20, Tokyo 25, noon."},
    {"role": "user", "content": "Thanks"},
]


def test_tool_turns_match_qwen25_text_template(hf_tok: Any) -> None:
    tools = [WEATHER_TOOL, {"type": "function", "function": TIME_FN}]
    expected = _hf_render(hf_tok, QWEN25_TEXT_TEMPLATE, AGENT_TURNS, tools=tools)
    assert render_chat(VL_TEMPLATE, AGENT_TURNS, tools=tools) == expected
    # A template with its own tools branch gets the tools and the messages unchanged.
    assert render_chat(QWEN25_TEXT_TEMPLATE, AGENT_TURNS, tools=tools) == expected


def test_tool_call_rendering_details() -> None:
    string_args = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "f", "arguments": '{"a": [1, 2], "b": "é"}'}}],
        },
    ]
    ours = render_chat(VL_TEMPLATE, string_args, add_generation_prompt=False)
    assert ours.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"a": [1, 2], "b": "é"}}'
        "\n</tool_call><|im_end|>\n"
    )
    # tool_calls without "type", and a bare {"name", "arguments"} call, are accepted too.
    bare = [string_args[0], {"role": "assistant", "tool_calls": [{"name": "f", "arguments": {}}]}]
    assert '{"name": "f", "arguments": {}}' in render_chat(VL_TEMPLATE, bare)


def test_tool_response_with_media_keeps_vision_handling() -> None:
    messages = [
        {"role": "user", "content": "Take a screenshot."},
        {"role": "assistant", "tool_calls": [{"function": {"name": "shot", "arguments": {}}}]},
        {"role": "tool", "content": [IMAGE, {"type": "text", "text": "done"}]},
        {"role": "tool", "content": "second"},
    ]
    ours = render_chat(VL_TEMPLATE, messages, add_vision_id=True)
    assert (
        "<|im_start|>user\n<tool_response>\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "done\n</tool_response>\n<tool_response>\nsecond\n</tool_response><|im_end|>\n"
    ) in ours


def test_generated_tool_call_round_trips() -> None:
    generated = (
        "I will look it up.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call>'
    )
    content, calls = parse_tool_calls(generated)
    history = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": content,
            "tool_calls": [
                {"type": "function", "function": {**c, "arguments": json.dumps(c["arguments"])}}
                for c in calls
            ],
        },
    ]
    rendered = render_chat(VL_TEMPLATE, history, add_generation_prompt=False)
    assert rendered.endswith(f"<|im_start|>assistant\n{generated}<|im_end|>\n")


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("messages", "tools", "match"),
    [
        ([], None, "non-empty"),
        ("hello", None, "non-empty"),
        ([{"role": "user", "content": "a"}, "b"], None, r"messages\[1\]"),
        ([{"role": "robot", "content": "a"}], None, r"messages\[0\].*robot"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], None, r"\[1\]"),
        ([{"role": "user", "content": [{"text": "no type"}]}], None, r"content\[0\]"),
        ([{"role": "user"}], None, "needs content"),
        ([{"role": "user", "content": "a", "tool_calls": []}], None, "only assistant"),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}],
            None,
            r"messages\[0\]\.tool_calls\[0\].*name",
        ),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
            None,
            "not valid JSON",
        ),
        ([{"role": "user", "content": "a"}], [{"description": "nameless"}], r"tools\[0\].*name"),
        ([{"role": "user", "content": "a"}], [{"type": "function", "function": 1}], r"tools\[0\]"),
        ([{"role": "user", "content": "a"}], [{"type": "retrieval", "function": {}}], "type"),
        ([{"role": "user", "content": "a"}], {"name": "f"}, "list"),
    ],
)
def test_validation_errors(messages: Any, tools: Any, match: str) -> None:
    with pytest.raises(PromptError, match=match):
        render_chat(VL_TEMPLATE, messages, tools=tools)


def test_none_valued_keys_are_dropped() -> None:
    messages = [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "yo", "tool_calls": None},
    ]
    clean = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render_chat(VL_TEMPLATE, messages) == render_chat(VL_TEMPLATE, clean)


def test_caller_messages_not_mutated() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "r"},
    ]
    snapshot = json.dumps(messages)
    render_chat(VL_TEMPLATE, messages, tools=[TIME_FN])
    assert json.dumps(messages) == snapshot
