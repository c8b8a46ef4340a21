"""Qwen's Hermes-style tool-call text format: writing calls into prompts, parsing them from output.

A call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. The chat template
renderer uses `format_tool_call` for assistant history; the server and `LLM.chat` use
`parse_tool_calls` on generated text, and `attach_tool_calls` fills
``CompletionOutput.tool_calls`` / ``.content`` (``LLM.chat(..., tools=[...])``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from qwenvl.structured import json_rule

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# The body may not contain another start tag, so an unclosed block cannot swallow the next one.
_START, _END = re.escape(TOOL_CALL_START), re.escape(TOOL_CALL_END)
_BLOCK_RE = re.compile(f"{_START}((?:(?!{_START}).)*?){_END}", re.DOTALL)


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """One call block as Qwen2.5's template writes it (JSON like ``tojson``: no ASCII escaping)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}"


def tool_call_grammar(tools: Sequence[dict[str, Any]], name: str | None = None) -> str:
    """A Lark grammar (llguidance's dialect) of exactly one call block to one of ``tools``
    (OpenAI function tools) or to the one called ``name``, its arguments valid against that
    tool's ``parameters`` schema: ``tool_choice="required"`` or a named function."""
    options = []
    for tool in tools:
        fn = tool.get("function", tool)
        if name is not None and fn.get("name") != name:
            continue
        params = fn.get("parameters") or {"type": "object"}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return f'start: {TOOL_CALL_START} "\\n" call "\\n" {TOOL_CALL_END}\n' + json_rule(
        schema, rule="call"
    )


def _parse_call(body: str) -> dict[str, Any] | None:
    """The call in a block's inner text, or None when it is not a well-formed call."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):  # some models double-encode the arguments
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return {"name": obj["name"], "arguments": arguments}


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split generated text into plain content and tool calls.

    Args:
        text: model output, possibly holding ``<tool_call>...</tool_call>`` blocks.

    Returns:
        ``(content, calls)``: ``calls`` is a list of ``{"name": str, "arguments": dict}`` in order;
        ``content`` is the text with the well-formed blocks removed and surrounding whitespace
        stripped. Malformed or unclosed blocks stay in ``content`` verbatim, except a final block
        whose closing tag alone is missing (generation stopped right after the JSON), which
        counts as a call. Arguments sent as a JSON string are decoded. Without any well-formed
        block, ``content`` is ``text`` unchanged.
    """
    calls: list[dict[str, Any]] = []
    pieces: list[str] = []
    pos = 0
    for match in _BLOCK_RE.finditer(text):
        call = _parse_call(match.group(1))
        if call is None:
            continue
        calls.append(call)
        pieces.append(text[pos : match.start()])
        pos = match.end()
    # A last block cut off before its closing tag but holding a complete call.
    last = text.rfind(TOOL_CALL_START)
    if last >= pos and TOOL_CALL_END not in text[last:]:
        call = _parse_call(text[last + len(TOOL_CALL_START) :])
        if call is not None:
            calls.append(call)
            pieces.append(text[pos:last])
            pos = len(text)
    if not calls:
        return text, []
    pieces.append(text[pos:])
    # Calls are separated by newlines; drop that padding but keep the prose between calls.
    content = "\n".join(p.strip() for p in pieces if p.strip())
    return content, calls


def new_tool_call_id() -> str:
    """A fresh ``call_...`` id (24 hex digits), as OpenAI-compatible servers hand out."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One function call the model made, in the OpenAI chat-completions shape.

    ``arguments`` is the decoded JSON object; ``to_openai()`` gives the wire form, whose
    ``arguments`` is a JSON string.
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_tool_call_id)
    type: str = "function"

    def to_openai(self) -> dict[str, Any]:
        """``{"id", "type": "function", "function": {"name", "arguments": "<json>"}}``."""
        return {
            "id": self.id,
            "type": "function",
            "function": {
                "name": self.name,
                "arguments": json.dumps(self.arguments, ensure_ascii=False),
            },
        }


def extract_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """``parse_tool_calls`` as ``(content or None when empty, [ToolCall, ...])``."""
    content, calls = parse_tool_calls(text)
    tool_calls = [ToolCall(c["name"], c["arguments"]) for c in calls]
    return (content if content.strip() else None), tool_calls


class Completion(Protocol):
    """What ``attach_tool_calls`` fills (``qwenvl.outputs.CompletionOutput``)."""

    text: str
    content: str | None
    tool_calls: list[ToolCall] | None


def attach_tool_calls(
    outputs: Iterable[Completion], tools: Sequence[dict[str, Any]] | None = None
) -> None:
    """Fill ``tool_calls`` and ``content`` of each completion from its ``text`` (in place);
    does nothing when ``tools`` is None or empty (the request offered no tools).

    ``content`` is the text without the ``<tool_call>`` blocks (None when nothing else is left);
    ``tool_calls`` is the list of calls, or None when the text holds none (then ``content`` is
    the whole text). Calls to names that are not among ``tools`` are still returned, as vLLM's
    Hermes parser does; ``tools`` is accepted so callers pass what the prompt offered.
    """
    if not tools:
        return
    for out in outputs:
        content, calls = extract_tool_calls(out.text)
        out.content = content
        out.tool_calls = calls or None
