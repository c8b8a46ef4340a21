"""The screen in the model's coordinate space, and the ``computer_use`` / ``mobile_use`` tool
definitions and system prompt that state it (see the package docstring)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from qwenvl.grounding import Point, convert, grounding_style, to_original
from qwenvl.processing.chat_template import DEFAULT_SYSTEM_PROMPT, format_tools_block
from qwenvl.processing.image import ImageGeometry, VisionPreprocessConfig, image_geometry

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
        grounding_style(self.family)  # a ValueError for an unknown family

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
        return grounding_style(self.family)

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
