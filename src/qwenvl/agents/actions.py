"""Typed agent actions in real screen pixels, parsed from tool calls or raw model text."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from qwenvl.agents.tools import (
    COMPUTER_ACTIONS,
    MOBILE_ACTIONS,
    STATUSES,
    SYSTEM_BUTTONS,
    TOOL_ACTIONS,
    Screen,
)
from qwenvl.errors import ActionError
from qwenvl.grounding import _json_objects
from qwenvl.tool_calls import ToolCall, parse_tool_calls

# ---------------------------------------------------------------------------------------------
# Actions (coordinates in real screen pixels)


@dataclass(frozen=True)
class MouseMove:
    x: int
    y: int


@dataclass(frozen=True)
class Click:
    """A click (``count=2``: double click); ``x``/``y`` None means at the current pointer."""

    x: int | None
    y: int | None
    button: Literal["left", "right", "middle"] = "left"
    count: int = 1


@dataclass(frozen=True)
class Drag:
    """Press the left button at the current pointer and release it at ``(x, y)``."""

    x: int
    y: int


@dataclass(frozen=True)
class Type:
    text: str


@dataclass(frozen=True)
class Key:
    """Keys pressed together (computer: ``("ctrl", "c")``; mobile: one adb key name)."""

    keys: tuple[str, ...]


@dataclass(frozen=True)
class Scroll:
    """Scroll by ``pixels`` as the model gave it (positive scrolls up), at ``(x, y)`` if given."""

    pixels: float
    x: int | None = None
    y: int | None = None


@dataclass(frozen=True)
class Wait:
    seconds: float


@dataclass(frozen=True)
class Terminate:
    status: Literal["success", "failure"]


@dataclass(frozen=True)
class LongPress:
    x: int
    y: int
    seconds: float


@dataclass(frozen=True)
class Swipe:
    x1: int
    y1: int
    x2: int
    y2: int


@dataclass(frozen=True)
class SystemButton:
    button: Literal["Back", "Home", "Menu", "Enter"]


@dataclass(frozen=True)
class Open:
    app: str


Action = (
    MouseMove
    | Click
    | Drag
    | Type
    | Key
    | Scroll
    | Wait
    | Terminate
    | LongPress
    | Swipe
    | SystemButton
    | Open
)


# ---------------------------------------------------------------------------------------------
# Parsing

_PAIR_RE = re.compile(r"^\s*[\[(]?\s*([-+]?[\d.eE+-]+)\s*[, ]\s*([-+]?[\d.eE+-]+)\s*[\])]?\s*$")


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise ActionError(f"{what} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ActionError(f"{what} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ActionError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _pair(value: Any, what: str) -> tuple[float, float]:
    """``[x, y]``, ``(x, y)``, ``"x, y"``, ``"(x, y)"`` or ``{"x": .., "y": ..}``."""
    if isinstance(value, str):
        m = _PAIR_RE.match(value)
        if not m:
            raise ActionError(f"{what} must be [x, y], got {value!r}")
        value = [m.group(1), m.group(2)]
    if isinstance(value, Mapping) and "x" in value and "y" in value:
        value = [value["x"], value["y"]]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ActionError(f"{what} must be [x, y], got {value!r}")
    return _num(value[0], what + "[0]"), _num(value[1], what + "[1]")


class _Args:
    """The arguments of one call, with lookups that raise ActionError naming the action."""

    def __init__(self, action: str, args: Mapping[str, Any], screen: Screen) -> None:
        self.action, self.args, self.screen = action, args, screen

    def has(self, key: str) -> bool:
        return self.args.get(key) is not None

    def get(self, key: str) -> Any:
        if not self.has(key):
            raise ActionError(f"action {self.action!r} needs the argument {key!r}")
        return self.args[key]

    def point(self, key: str = "coordinate") -> tuple[int, int]:
        x, y = _pair(self.get(key), f"{self.action}: {key}")
        return self.screen.to_screen(x, y)

    def number(self, key: str) -> float:
        value = _num(self.get(key), f"{self.action}: {key}")
        if value < 0:
            raise ActionError(f"{self.action}: {key} must not be negative, got {value:g}")
        return value

    def text(self, key: str = "text") -> str:
        value = self.get(key)
        if isinstance(value, (dict, list)):
            raise ActionError(f"{self.action}: {key} must be a string, got {value!r}")
        return str(value)

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        value = self.text(key)
        for option in options:
            if value.strip().lower() == option.lower():
                return option
        raise ActionError(
            f"{self.action}: {key} must be one of {', '.join(options)}, got {value!r}"
        )

    def keys(self) -> tuple[str, ...]:
        value = self.args.get("keys", self.args.get("text"))
        if value is None:
            raise ActionError(f"action {self.action!r} needs the argument 'keys'")
        if isinstance(value, str):
            value = [k for k in value.split("+")] if "+" in value.strip("+") else [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ActionError(f"{self.action}: keys must be a list of key names, got {value!r}")
        if not all(isinstance(k, str) and k.strip() for k in value):
            raise ActionError(f"{self.action}: keys must be non-empty strings, got {value!r}")
        return tuple(k.strip() for k in value)


_CLICKS: dict[str, tuple[Literal["left", "right", "middle"], int]] = {
    "left_click": ("left", 1),
    "right_click": ("right", 1),
    "middle_click": ("middle", 1),
    "double_click": ("left", 2),
}


def _action(action: str, a: _Args) -> Action:
    if action in _CLICKS:
        button, count = _CLICKS[action]
        if a.has("coordinate"):
            x, y = a.point()
            return Click(x, y, button, count)
        return Click(None, None, button, count)
    if action == "click":
        x, y = a.point()
        return Click(x, y)
    if action == "mouse_move":
        return MouseMove(*a.point())
    if action == "left_click_drag":
        return Drag(*a.point())
    if action == "type":
        return Type(a.text())
    if action == "key":
        return Key(a.keys())
    if action == "scroll":
        pixels = _num(a.get("pixels"), "scroll: pixels")
        if a.has("coordinate"):
            x, y = a.point()
            return Scroll(pixels, x, y)
        return Scroll(pixels)
    if action == "wait":
        return Wait(a.number("time"))
    if action == "terminate":
        return Terminate(a.choice("status", STATUSES))  # type: ignore[arg-type]
    if action == "long_press":
        x, y = a.point()
        return LongPress(x, y, a.number("time"))
    if action == "swipe":
        x1, y1 = a.point("coordinate")
        x2, y2 = a.point("coordinate2")
        return Swipe(x1, y1, x2, y2)
    if action == "system_button":
        return SystemButton(a.choice("button", SYSTEM_BUTTONS))  # type: ignore[arg-type]
    if action == "open":
        return Open(a.text())
    raise AssertionError(action)  # pragma: no cover - filtered by the caller


def _name_and_arguments(call: Any) -> tuple[str | None, Any]:
    if isinstance(call, ToolCall):
        return call.name, call.arguments
    if not isinstance(call, Mapping):
        raise ActionError(f"a tool call must be a ToolCall or a dict, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, Mapping):
        raise ActionError(f"'function' must be a dict, got {fn!r}")
    if "arguments" not in fn and "action" in fn:  # the arguments object alone
        return None, fn
    arguments = fn.get("arguments")
    if isinstance(arguments, str):  # OpenAI wire form
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ActionError(f"tool call arguments are not valid JSON: {e}") from e
    name = fn.get("name")
    return (name if isinstance(name, str) else None), arguments


def parse_action(call: ToolCall | Mapping[str, Any], screen: Screen) -> Action:
    """One ``computer_use`` / ``mobile_use`` call as an action in real screen pixels.

    Args:
        call: a :class:`~qwenvl.tool_calls.ToolCall`, a ``{"name", "arguments"}`` dict, an
            OpenAI ``{"function": {"name", "arguments": "<json>"}}`` dict, or the arguments
            object alone (``{"action": ...}``; both action spaces are then accepted).
        screen: the screenshot's screen; coordinates are mapped from the model's space.

    Raises:
        ActionError: an unknown tool or action, a missing or malformed argument.
    """
    name, arguments = _name_and_arguments(call)
    if not isinstance(arguments, Mapping):
        raise ActionError(f"tool call arguments must be a JSON object, got {arguments!r}")
    if name is None:
        allowed = tuple(dict.fromkeys(COMPUTER_ACTIONS + MOBILE_ACTIONS))
    elif name in TOOL_ACTIONS:
        allowed = TOOL_ACTIONS[name]
    else:
        raise ActionError(f"unknown tool {name!r}; expected one of {', '.join(TOOL_ACTIONS)}")
    action = arguments.get("action")
    if action is None:
        raise ActionError(f"the {name or 'tool'} call has no 'action' argument")
    if not isinstance(action, str) or action not in allowed:
        raise ActionError(
            f"unknown {name or 'agent'} action {action!r}; expected one of {', '.join(allowed)}"
        )
    return _action(action, _Args(action, arguments, screen))


def parse_actions(output: Any, screen: Screen) -> list[Action]:
    """Every action in a model reply, in order, in real screen pixels.

    Args:
        output: the generated text (``<tool_call>`` blocks; a bare ``{"name": ...,
            "arguments": ...}`` or ``{"action": ...}`` object without tags is accepted too), a
            ``CompletionOutput`` (its ``tool_calls`` when set, else its ``text``), or a list of
            tool calls.
        screen: the screenshot's screen.

    Raises:
        ActionError: no call in the output, or one that :func:`parse_action` rejects.
    """
    if isinstance(output, (list, tuple)):
        calls: list[Any] = list(output)
    elif isinstance(output, str):
        calls = _calls_in_text(output)
    elif hasattr(output, "text"):
        tool_calls = getattr(output, "tool_calls", None)
        calls = list(tool_calls) if tool_calls else _calls_in_text(output.text)
    else:
        raise ActionError(f"cannot read actions from {type(output).__name__}")
    if not calls:
        raise ActionError("the model output holds no tool call")
    return [parse_action(call, screen) for call in calls]


def _calls_in_text(text: str) -> list[Any]:
    _, calls = parse_tool_calls(text)
    if calls:
        return list(calls)
    # No well-formed <tool_call> block: a bare JSON call, if the model left the tags out.
    if "<tool_call>" in text:
        raise ActionError(f"malformed <tool_call> block in the model output: {text[:200]!r}")
    return [o for o in _json_objects(text) if "action" in o or isinstance(o.get("arguments"), dict)]
