"""Qwen's Hermes-style tool-call text format: writing calls into prompts, parsing them from output.

A call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. The chat template
renderer uses `format_tool_call` for assistant history; the server and `LLM.chat` use
`parse_tool_calls` on generated text.
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# The body may not contain another start tag, so an unclosed block cannot swallow the next one.
_START, _END = re.escape(TOOL_CALL_START), re.escape(TOOL_CALL_END)
_BLOCK_RE = re.compile(f"{_START}((?:(?!{_START}).)*?){_END}", re.DOTALL)


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """One call block as Qwen2.5's template writes it (JSON like ``tojson``: no ASCII escaping)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}"


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
        stripped. Malformed or unclosed blocks stay in ``content`` verbatim. Without any
        well-formed block, ``content`` is ``text`` unchanged.
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
    if not calls:
        return text, []
    pieces.append(text[pos:])
    # Calls are separated by newlines; drop that padding but keep the prose between calls.
    content = "\n".join(p.strip() for p in pieces if p.strip())
    return content, calls
