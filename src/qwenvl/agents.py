"""Visual agents: the ``computer_use`` and ``mobile_use`` tools of the Qwen2.5-VL cookbooks.

The model sees a screenshot and answers with a Hermes-style tool call such as
``<tool_call>\\n{"name": "computer_use", "arguments": {"action": "left_click", "coordinate":
[512, 300]}}\\n</tool_call>``. Its coordinates are in the model's own space (reference notes
section 9): for **Qwen2.5-VL** pixels of the *resized* screenshot (``smart_resize`` of the real
screen size under the processor's pixel limits), for **Qwen2-VL** the 0..1000 normalised scale.
The tool descriptions state the screen resolution in that space, which is what the cookbooks do.

* :class:`Screen` ties a real screen size to that space (and maps points both ways, through the
  conversion helpers of :mod:`qwenvl.grounding`).
* :func:`computer_use_tool` / :func:`mobile_use_tool` build the OpenAI function-tool dicts
  (pass them as ``LLM.chat(..., tools=[...])``), :func:`agent_system_prompt` the system text
  with the ``# Tools`` block for use without ``tools=``.
* :func:`parse_action` / :func:`parse_actions` turn calls (or raw model text) into typed actions
  whose coordinates are real screen pixels; anything unusable raises
  :class:`~qwenvl.errors.ActionError` saying what is wrong.

``examples/agent_loop.py`` runs a loop against a simulated screen.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from qwenvl.errors import ActionError
from qwenvl.grounding import FAMILIES, Point, _json_objects, convert, to_original
from qwenvl.processing.chat_template import DEFAULT_SYSTEM_PROMPT, format_tools_block
from qwenvl.processing.image import ImageGeometry, VisionPreprocessConfig, image_geometry
from qwenvl.tool_calls import ToolCall, parse_tool_calls

__all__ = [
    "COMPUTER_ACTIONS",
    "MOBILE_ACTIONS",
    "SYSTEM_BUTTONS",
    "Action",
    "Click",
    "Drag",
    "Key",
    "LongPress",
    "MouseMove",
    "Open",
    "Screen",
    "Scroll",
    "Swipe",
    "SystemButton",
    "Terminate",
    "Type",
    "Wait",
    "agent_system_prompt",
    "computer_use_tool",
    "mobile_use_tool",
    "parse_action",
    "parse_actions",
]

COMPUTER_ACTIONS = (
    "key",
    "type",
    "mouse_move",
    "left_click",
    "left_click_drag",
    "right_click",
    "middle_click",
    "double_click",
    "scroll",
    "wait",
    "terminate",
)
MOBILE_ACTIONS = (
    "key",
    "click",
    "long_press",
    "swipe",
    "type",
    "system_button",
    "open",
    "wait",
    "terminate",
)
SYSTEM_BUTTONS = ("Back", "Home", "Menu", "Enter")
STATUSES = ("success", "failure")
TOOL_ACTIONS = {"computer_use": COMPUTER_ACTIONS, "mobile_use": MOBILE_ACTIONS}


# ---------------------------------------------------------------------------------------------
# The screen and the model's coordinate space


@dataclass(frozen=True)
class Screen:
    """A real screen (the screenshot's original size) and the coordinate space the model uses.

    ``geometry`` is the screenshot's :class:`~qwenvl.processing.image.ImageGeometry`: take it
    from ``RequestOutput.images`` of the request that showed the screenshot, or build it with
    :meth:`for_screenshot` (the same ``smart_resize`` the processor applies).
    """

    geometry: ImageGeometry
    family: str

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    @classmethod
    def for_screenshot(
        cls,
        width: int,
        height: int,
        family: str,
        vision: VisionPreprocessConfig | None = None,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> Screen:
        """The screen of a ``width`` x ``height`` screenshot as the processor will resize it.

        Args:
            vision: the checkpoint's preprocessing config (``llm.processor.vision``); default the
                released limits.
            min_pixels, max_pixels: per-image overrides, as in a content item.
        """
        geometry = image_geometry(
            width,
            height,
            vision or VisionPreprocessConfig(),
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        return cls(geometry, family)

    @classmethod
    def from_llm(cls, llm: Any, width: int, height: int) -> Screen:
        """The screen as ``llm`` (an ``LLM``) will see a ``width`` x ``height`` screenshot."""
        return cls.for_screenshot(width, height, llm.config.family, llm.processor.vision)

    @property
    def width(self) -> int:
        """Real screen width in pixels."""
        return self.geometry.original_width

    @property
    def height(self) -> int:
        """Real screen height in pixels."""
        return self.geometry.original_height

    @property
    def space(self) -> Literal["resized", "norm1000"]:
        """The model's coordinate space: resized-screenshot pixels or the 0..1000 scale."""
        return "resized" if self.family == "qwen2_5_vl" else "norm1000"

    @property
    def model_size(self) -> tuple[int, int]:
        """``(width, height)`` of the screen in the model's space (what the tool states)."""
        if self.space == "resized":
            return self.geometry.resized_width, self.geometry.resized_height
        return 1000, 1000

    def to_screen(self, x: float, y: float) -> tuple[int, int]:
        """A point in the model's space as real screen pixels (rounded, clamped to the screen)."""
        p = to_original(Point(float(x), float(y), space=self.space), self.geometry)
        assert isinstance(p, Point)
        return (
            min(max(round(p.x), 0), self.width - 1),
            min(max(round(p.y), 0), self.height - 1),
        )

    def to_model(self, x: float, y: float) -> tuple[int, int]:
        """Real screen pixels as the integer coordinates the model would write."""
        p = convert(Point(float(x), float(y), space="original"), self.geometry, self.space)
        assert isinstance(p, Point)
        w, h = self.model_size
        return min(round(p.x), w - 1), min(round(p.y), h - 1)


# ---------------------------------------------------------------------------------------------
# Tool definitions


def _resolution_line(screen: Screen) -> str:
    w, h = screen.model_size
    line = f"* The screen's resolution is {w}x{h}."
    if screen.space == "norm1000":
        line += " Coordinates are relative: (0, 0) is the top-left, (1000, 1000) the bottom-right."
    return line


def _function(name: str, human: str, description: str, parameters: dict[str, Any]) -> dict:
    # The cookbooks build their tools with qwen-agent, whose prompt carries name_for_human and
    # args_format as well (reference notes 4.3); kept so the prompt looks the same.
    return {
        "type": "function",
        "function": {
            "name_for_human": human,
            "name": name,
            "description": description,
            "parameters": parameters,
            "args_format": "Format the arguments as a JSON object.",
        },
    }


def computer_use_tool(screen: Screen) -> dict[str, Any]:
    """The ``computer_use`` tool (mouse and keyboard on a desktop), resolution in model space."""
    description = "\n".join(
        [
            "Use a mouse and keyboard to interact with a computer, and take screenshots.",
            "* This is an interface to a desktop GUI. There is no terminal or applications "
            "menu: start applications by clicking their desktop icons.",
            "* Applications may take time to start or respond; wait and take another "
            "screenshot to see the result of an action.",
            _resolution_line(screen),
            "* Look at a screenshot to find an element's coordinates before moving the cursor "
            "to it.",
            "* Click buttons, links and icons with the cursor tip in the center of the "
            "element, not on its edges.",
        ]
    )
    actions = "\n".join(
        [
            "The action to perform. The available actions are:",
            "* `key`: Press the keys in `keys` in order, then release them in reverse order.",
            "* `type`: Type a string of text on the keyboard.",
            "* `mouse_move`: Move the cursor to the (x, y) pixel coordinate on the screen.",
            "* `left_click`: Click the left mouse button at the (x, y) pixel coordinate.",
            "* `left_click_drag`: Click and drag the cursor to the (x, y) pixel coordinate.",
            "* `right_click`: Click the right mouse button at the (x, y) pixel coordinate.",
            "* `middle_click`: Click the middle mouse button at the (x, y) pixel coordinate.",
            "* `double_click`: Double-click the left mouse button at the (x, y) pixel coordinate.",
            "* `scroll`: Scroll the mouse wheel.",
            "* `wait`: Wait the given seconds for a change to happen.",
            "* `terminate`: End the task and report whether it succeeded.",
        ]
    )
    parameters = {
        "properties": {
            "action": {"description": actions, "enum": list(COMPUTER_ACTIONS), "type": "string"},
            "keys": {"description": "Required only by `action=key`.", "type": "array"},
            "text": {"description": "Required only by `action=type`.", "type": "string"},
            "coordinate": {
                "description": "(x, y): the x (pixels from the left edge) and y (pixels from "
                "the top edge) coordinates to move the mouse to. Required only by "
                "`action=mouse_move` and `action=left_click_drag`.",
                "type": "array",
            },
            "pixels": {
                "description": "How far to scroll. Positive values scroll up, negative values "
                "scroll down. Required only by `action=scroll`.",
                "type": "number",
            },
            "time": {
                "description": "Seconds to wait. Required only by `action=wait`.",
                "type": "number",
            },
            "status": {
                "description": "The status of the task. Required only by `action=terminate`.",
                "type": "string",
                "enum": list(STATUSES),
            },
        },
        "required": ["action"],
        "type": "object",
    }
    return _function("computer_use", "computer_use", description, parameters)


def mobile_use_tool(screen: Screen) -> dict[str, Any]:
    """The ``mobile_use`` tool (a touchscreen phone), resolution in the model's space."""
    description = "\n".join(
        [
            "Use a touchscreen to interact with a mobile device, and take screenshots.",
            "* This is an interface to a mobile device with a touchscreen. You can click, "
            "type, swipe and more.",
            "* Applications may take time to start or respond; wait and take another "
            "screenshot to see the result of an action.",
            _resolution_line(screen),
            "* Click buttons, links and icons in the center of the element, not on its edges.",
        ]
    )
    actions = "\n".join(
        [
            "The action to perform. The available actions are:",
            "* `key`: Send a key event to the device (adb `keyevent` names such as "
            '"volume_up", "volume_down", "power", "camera", "clear").',
            "* `click`: Click the point (x, y) on the screen.",
            "* `long_press`: Press the point (x, y) on the screen for the given seconds.",
            "* `swipe`: Swipe from (x, y) in `coordinate` to (x2, y2) in `coordinate2`.",
            "* `type`: Enter the text into the active input box.",
            "* `system_button`: Press a system button.",
            "* `open`: Open an app on the device.",
            "* `wait`: Wait the given seconds for a change to happen.",
            "* `terminate`: End the task and report whether it succeeded.",
        ]
    )
    point = (
        "(x, y): the x (pixels from the left edge) and y (pixels from the top edge) "
        "coordinates of the point."
    )
    parameters = {
        "properties": {
            "action": {"description": actions, "enum": list(MOBILE_ACTIONS), "type": "string"},
            "coordinate": {
                "description": f"{point} Required only by `action=click`, `action=long_press` "
                "and `action=swipe`.",
                "type": "array",
            },
            "coordinate2": {
                "description": f"{point} Required only by `action=swipe`.",
                "type": "array",
            },
            "text": {
                "description": "Required only by `action=key`, `action=type` and `action=open`.",
                "type": "string",
            },
            "time": {
                "description": "Seconds to wait. Required only by `action=long_press` and "
                "`action=wait`.",
                "type": "number",
            },
            "button": {
                "description": "Back returns to the previous screen, Home to the desktop, Menu "
                "opens the recent-apps menu and Enter presses enter. Required only by "
                "`action=system_button`.",
                "enum": list(SYSTEM_BUTTONS),
                "type": "string",
            },
            "status": {
                "description": "The status of the task. Required only by `action=terminate`.",
                "type": "string",
                "enum": list(STATUSES),
            },
        },
        "required": ["action"],
        "type": "object",
    }
    return _function("mobile_use", "mobile_use", description, parameters)


def agent_system_prompt(
    tools: Iterable[dict[str, Any]], system: str = DEFAULT_SYSTEM_PROMPT
) -> str:
    """``system`` followed by the ``# Tools`` block for ``tools``, as the cookbooks build it.

    Equivalent to passing ``tools=`` to ``LLM.chat`` with this ``system`` message; useful for
    servers or templates that do not take ``tools``.
    """
    normalised = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    return system + format_tools_block(normalised)


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
