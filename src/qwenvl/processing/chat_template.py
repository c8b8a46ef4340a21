"""Chat templates: find a checkpoint's template, validate messages, render them like transformers.

`render_chat` runs the checkpoint's own Jinja template in a sandbox configured as transformers'
``apply_chat_template`` does (trim/lstrip blocks, ``raise_exception``, a non-escaping ``tojson``),
so the prompt text is byte-identical. The released Qwen2-VL / Qwen2.5-VL template has no tools
branch, so for such templates qwenvl supplies Qwen2.5's Hermes-style tool support itself: the
``# Tools`` block is appended to the system message, assistant ``tool_calls`` become
``<tool_call>`` blocks and ``tool`` results become ``<tool_response>`` user turns. This is done by
rewriting the messages before rendering, so the template's image/video handling still applies.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenvl.errors import ConfigError, PromptError
from qwenvl.tokenizer import special_token_pattern
from qwenvl.tool_calls import format_tool_call

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant", "tool")
# Qwen2.5's tools block, split around the one-JSON-object-per-line tool list.
TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

# ---------------------------------------------------------------------------------------------
# Loading


def load_chat_template(checkpoint_dir: str | os.PathLike[str]) -> str:
    """The chat template of a checkpoint folder.

    Looks in ``chat_template.json`` (``{"chat_template": ...}``), then ``chat_template.jinja``, then
    ``tokenizer_config.json["chat_template"]`` (a string, or a list of ``{name, template}`` from
    which "default" is taken).

    Raises:
        ConfigError: no template in any of those files, or a file is malformed.
    """
    folder = Path(checkpoint_dir)
    json_file = folder / "chat_template.json"
    if json_file.is_file():
        value = _read_json(json_file).get("chat_template")
        if not isinstance(value, str):
            raise ConfigError(f"{json_file} has no string 'chat_template'")
        return value
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        value = _read_json(cfg_file).get("chat_template")
        if value is not None:
            return _pick_default(value, cfg_file)
    raise ConfigError(
        f"no chat template in {folder}: looked for chat_template.json, chat_template.jinja and "
        "tokenizer_config.json['chat_template']"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _pick_default(value: Any, source: Path) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # transformers saves named templates as [{name, template}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    elif isinstance(value, dict):
        named = value
    else:
        named = {}
    template = named.get("default")
    if not isinstance(template, str):
        raise ConfigError(f"{source}: 'chat_template' has no 'default' template")
    return template


# ---------------------------------------------------------------------------------------------
# The Jinja environment (configured like transformers' chat template renderer)


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (assistant-mask markers) as a no-op."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_passthrough")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _passthrough(self, caller: Any) -> str:
        return str(caller())


def _check_attr_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (no route to Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_attr_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_attr_name(name)
        super().__setitem__(name, value)


class _DictFactory:
    """``dict(...)`` for templates without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes '<', '>', '&' and "'"; chat templates must not.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _DictFactory()
    return env


_ENV = _make_env()


@lru_cache(maxsize=16)
def _compile(template: str) -> tuple[jinja2.Template, bool]:
    """The compiled template, and whether it reads the ``tools`` variable itself."""
    try:
        ast = _ENV.parse(template)
        compiled = _ENV.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not compile: {e}") from e
    return compiled, "tools" in jinja2.meta.find_undeclared_variables(ast)


# ---------------------------------------------------------------------------------------------
# Validation and normalisation of messages and tools


def _plain(value: Any) -> Any:
    """A fresh copy made of JSON types only; other objects (images, arrays) become "<Type>".

    The sandbox cannot know which methods of arbitrary objects are harmful, and templates only
    test media keys for presence, so placeholders render the same.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise PromptError(f"{where}: content must be a string or a list of items")
    for j, item in enumerate(content):
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise PromptError(f"{where}.content[{j}]: each item must be a dict with a 'type'")


def _parse_tool_call(call: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(call, dict):
        raise PromptError(f"{where}: must be a dict")
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        raise PromptError(f"{where}: 'function' must be a dict")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise PromptError(f"{where}: a function name is required")
    arguments = fn.get("arguments")
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str):  # the OpenAI wire format carries arguments as JSON text
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise PromptError(f"{where}: arguments are not valid JSON: {e}") from e
    if not isinstance(arguments, dict):
        raise PromptError(f"{where}: arguments must be a JSON object")
    return name, arguments


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check roles, content and tool_calls; returns copies without None-valued keys."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list")
    out = []
    for i, raw in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise PromptError(f"{where}: must be a dict, got {type(raw).__name__}")
        # Like transformers: OpenAI clients send content=None / tool_calls=None for "absent".
        msg = {k: v for k, v in raw.items() if v is not None}
        role = msg.get("role")
        if role not in ROLES:
            raise PromptError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if "content" in msg:
            _check_content(msg["content"], where)
        elif role != "assistant":
            raise PromptError(f"{where}: a {role} message needs content")
        if "tool_calls" in msg:
            calls = msg["tool_calls"]
            if role != "assistant":
                raise PromptError(f"{where}: only assistant messages may carry tool_calls")
            if not isinstance(calls, list):
                raise PromptError(f"{where}: tool_calls must be a list")
            for j, call in enumerate(calls):
                _parse_tool_call(call, f"{where}.tool_calls[{j}]")
        out.append(msg)
    return out


def _normalize_tools(tools: Any) -> list[dict[str, Any]]:
    """Tools as ``{"type": "function", "function": {...}}``; bare function dicts are wrapped."""
    if not isinstance(tools, list):
        raise PromptError("tools must be a list")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise PromptError(f"{where}: must be a dict")
        if "function" in tool:
            if tool.get("type", "function") != "function":
                raise PromptError(f"{where}: only tools of type 'function' are supported")
            fn = tool["function"]
        else:
            fn = tool
        if not isinstance(fn, dict):
            raise PromptError(f"{where}: 'function' must be a dict")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise PromptError(f"{where}: a function name is required")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise PromptError(f"{where}: parameters must be a JSON schema object")
        out.append({"type": "function", "function": fn})
    return out


def format_tools_block(tools: list[dict[str, Any]]) -> str:
    """The ``# Tools`` text appended to the system message (tools already normalised)."""
    lines = "".join("\n" + _tojson(tool) for tool in tools)
    return TOOLS_HEADER + lines + TOOLS_FOOTER


def _append_text(content: Any, text: str) -> Any:
    """`content` (string or item list) followed by `text`."""
    if isinstance(content, list):
        return [*content, {"type": "text", "text": text}]
    return content + text


def _fold_assistant(msg: dict[str, Any]) -> dict[str, Any]:
    where = "tool_calls"
    calls = [_parse_tool_call(c, where) for c in msg["tool_calls"]]
    blocks = "\n".join(format_tool_call(name, args) for name, args in calls)
    out = {k: v for k, v in msg.items() if k != "tool_calls"}
    content = msg.get("content")
    out["content"] = _append_text(content, "\n" + blocks) if content else blocks
    return out


def _fold_tool_results(group: list[dict[str, Any]]) -> dict[str, Any]:
    """Consecutive tool results as one user turn of ``<tool_response>`` blocks."""
    contents = [m["content"] for m in group]
    if all(isinstance(c, str) for c in contents):
        text = "\n".join(f"<tool_response>\n{c}\n</tool_response>" for c in contents)
        return {"role": "user", "content": text}
    items: list[dict[str, Any]] = []
    for k, c in enumerate(contents):
        opening = ("\n" if k else "") + "<tool_response>\n"
        items.append({"type": "text", "text": opening})
        items.extend(c if isinstance(c, list) else [{"type": "text", "text": c}])
        items.append({"type": "text", "text": "\n</tool_response>"})
    return {"role": "user", "content": items}


def _fold_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rewrite tool_calls and tool results into plain text turns, as Qwen2.5's template does."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        msg = messages[i]
        if msg["role"] == "tool":
            j = i
            while j < len(messages) and messages[j]["role"] == "tool":
                j += 1
            out.append(_fold_tool_results(messages[i:j]))
            i = j
            continue
        out.append(_fold_assistant(msg) if "tool_calls" in msg else msg)
        i += 1
    return out


def _with_tools_system(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    block = format_tools_block(tools)
    first = messages[0]
    if first["role"] == "system":
        return [{**first, "content": _append_text(first["content"], block)}, *messages[1:]]
    return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT + block}, *messages]


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class RenderedChat:
    """A rendered chat and where in it the template itself wrote special tokens.

    ``control`` holds the ``(start, end)`` character spans of the template's own markers
    (``<|im_start|>``, ``<|vision_start|>``...). Only those are encoded as special tokens; the
    same strings typed in a message are text (`Tokenizer.encode_marked`).
    """

    text: str
    control: tuple[tuple[int, int], ...]


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    add_vision_id: bool = False,
    tools: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """Render `messages` with a chat template, exactly as transformers' apply_chat_template would.

    Args:
        template: the Jinja template text (compiled once per distinct string).
        messages: OpenAI-style messages; roles system/user/assistant/tool; content a string or a
            list of ``{"type": ...}`` items (text, image, image_url, video).
        add_generation_prompt: end with the assistant header.
        add_vision_id: label media as "Picture n:" / "Video n:".
        tools: function tools, ``{"type": "function", "function": {...}}`` or bare function dicts.
        **extra: further template variables (e.g. ``eos_token``).

    Raises:
        PromptError: malformed messages/tools, or the template raised.
        ConfigError: the template does not compile.
    """
    compiled, msgs, template_tools = _prepare(template, messages, tools)
    variables = dict(add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    return _render(compiled, msgs, template_tools, **variables, **_plain(extra))


def render_chat_marked(
    template: str,
    messages: list[dict[str, Any]],
    special_tokens: Iterable[str],
    *,
    add_generation_prompt: bool = True,
    add_vision_id: bool = False,
    tools: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> RenderedChat:
    """`render_chat`, plus the spans of the special tokens the template wrote itself.

    Every string of the messages and tools is data. The chat is rendered a second time with each
    special-token string in that data blanked out (same length); the special tokens still found
    are the template's, at the same places in the real text. A template that changes the length
    of message text cannot be checked this way and is refused.
    """
    compiled, msgs, template_tools = _prepare(template, messages, tools)
    variables = dict(add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    variables.update(_plain(extra))
    text = _render(compiled, msgs, template_tools, **variables)
    pattern = special_token_pattern(special_tokens)
    blank_msgs, blank_tools = _blank(msgs, pattern), _blank(template_tools, pattern)
    if blank_msgs == msgs and blank_tools == template_tools:
        blanked = text
    else:
        blanked = _render(compiled, blank_msgs, blank_tools, **variables)
    spans = tuple((m.start(), m.end()) for m in pattern.finditer(blanked))
    if len(blanked) != len(text) or any(text[a:b] != blanked[a:b] for a, b in spans):
        raise PromptError(
            "the chat template changes the length of message text, so qwenvl cannot tell its "
            "control tokens from special-token strings typed in the messages; remove those "
            "strings, or let trusted callers parse them (special_tokens_in_content=True)"
        )
    return RenderedChat(text, spans)


def _blank(value: Any, pattern: re.Pattern[str]) -> Any:
    """A copy of `value` with every match of `pattern` in its strings (not keys) turned into as
    many NUL characters."""
    if isinstance(value, str):
        return pattern.sub(lambda m: "\0" * len(m.group()), value)
    if isinstance(value, dict):
        return {k: _blank(v, pattern) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank(v, pattern) for v in value]
    return value


def _prepare(
    template: str, messages: Any, tools: Any
) -> tuple[jinja2.Template, list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The compiled template, the validated messages and the tools as the template takes them
    (folded into the messages when the template has no tools branch)."""
    compiled, template_has_tools = _compile(template)
    msgs = _validate_messages(_plain(messages))
    tool_list = _normalize_tools(_plain(tools)) if tools is not None else None
    if template_has_tools:
        return compiled, msgs, tool_list
    msgs = _fold_tool_messages(msgs)
    if tool_list:
        msgs = _with_tools_system(msgs, tool_list)
    return compiled, msgs, None


def _render(
    compiled: jinja2.Template, msgs: list[dict[str, Any]], tools: Any, **variables: Any
) -> str:
    try:
        return compiled.render(messages=msgs, tools=tools, documents=None, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise PromptError(f"chat template error: {e}") from e
