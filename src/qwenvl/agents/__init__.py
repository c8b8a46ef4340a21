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

from qwenvl.agents.actions import (
    Action,
    Click,
    Drag,
    Key,
    LongPress,
    MouseMove,
    Open,
    Scroll,
    Swipe,
    SystemButton,
    Terminate,
    Type,
    Wait,
    parse_action,
    parse_actions,
)
from qwenvl.agents.tools import (
    COMPUTER_ACTIONS,
    MOBILE_ACTIONS,
    SYSTEM_BUTTONS,
    Screen,
    agent_system_prompt,
    computer_use_tool,
    mobile_use_tool,
)

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
