"""Incremental ``<tool_call>{json}</tool_call>`` parsing for streamed replies.

``ToolCallStream.feed(delta)`` returns the content that is safe to show and the calls completed so
far; text that might be the start of a tag (``"<tool"``) is held back until it is decided, so a
half tag never reaches ``content``. A call is emitted whole when its closing tag arrives (OpenAI
clients accumulate ``arguments`` deltas, so one delta with the full JSON is valid). ``finish()``
settles the rest the way :func:`qwenvl.tool_calls.parse_tool_calls` settles a whole text: a last
block cut off before ``</tool_call>`` that holds a complete call counts, anything malformed is
returned as content verbatim. Whitespace that only separates content from calls is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenvl.tool_calls import TOOL_CALL_END, TOOL_CALL_START, ToolCall, _parse_call


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


@dataclass
class ToolCallStream:
    """State of one streamed choice. ``calls`` lists every call emitted so far."""

    calls: list[ToolCall] = field(default_factory=list)
    _buf: str = ""  # undecided text: a possible tag start, or the body of an open call
    _in_call: bool = False
    _space: str = ""  # whitespace held until we know it is not padding around a call
    _emitted_content: bool = False
    _after_call: bool = False

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buf += delta
        content: list[str] = []
        new: list[ToolCall] = []
        while True:
            if self._in_call:
                end = self._buf.find(TOOL_CALL_END)
                if end < 0:
                    break
                body = self._buf[:end]
                self._buf = self._buf[end + len(TOOL_CALL_END) :]
                self._in_call = False
                call = _parse_call(body)
                if call is None:  # malformed: shown verbatim, as parse_tool_calls does
                    content.append(self._text(TOOL_CALL_START + body + TOOL_CALL_END))
                else:
                    self._space = ""
                    self._after_call = True
                    tc = ToolCall(call["name"], call["arguments"])
                    self.calls.append(tc)
                    new.append(tc)
                continue
            start = self._buf.find(TOOL_CALL_START)
            if start >= 0:
                content.append(self._text(self._buf[:start]))
                self._buf = self._buf[start + len(TOOL_CALL_START) :]
                self._in_call = True
                continue
            keep = _held_prefix(self._buf, TOOL_CALL_START)
            content.append(self._text(self._buf[: len(self._buf) - keep]))
            self._buf = self._buf[len(self._buf) - keep :]
            break
        return "".join(content), new

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Settle what is still held at the end of the stream."""
        if self._in_call:
            self._in_call = False
            body, self._buf = self._buf, ""
            call = _parse_call(body)
            if call is not None:
                self._space = ""
                tc = ToolCall(call["name"], call["arguments"])
                self.calls.append(tc)
                return "", [tc]
            return self._text(TOOL_CALL_START + body), []
        rest, self._buf = self._buf, ""
        text = self._text(rest)
        if not self.calls:  # no call at all: the text stays exactly as generated
            text += self._space
            self._space = ""
        return text, []

    def _text(self, text: str, before_call: bool = False) -> str:
        """Content to emit now. Trailing whitespace is held until visible text follows (and
        dropped when a call follows); after a call, content restarts on a new line."""
        if before_call:
            text = text.rstrip()
        full = self._space + text
        self._space = ""
        if not full.strip():
            if not before_call:
                self._space = full
            return ""
        if self._after_call:
            full = full.lstrip()
            if self._emitted_content:
                full = "\n" + full
            self._after_call = False
        body = full.rstrip()
        if not before_call:
            self._space = full[len(body) :]
        self._emitted_content = True
        return body
