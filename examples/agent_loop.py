"""A visual agent loop against a simulated screen, with the Qwen2.5-VL cookbook tools.

Each step takes a screenshot of a PIL-drawn "app" (a text field and two buttons), asks a policy
for the next action in the cookbook's tool-call format, parses it with ``qwenvl.agents`` (model
coordinates -> real screen pixels) and applies it to the screen, until the policy terminates.

    python examples/agent_loop.py                       # scripted policy: runs without weights
    python examples/agent_loop.py --family qwen2_vl     # the same, in 0..1000 coordinates
    python examples/agent_loop.py --mobile              # the mobile_use action space
    python examples/agent_loop.py --model DIR           # a real checkpoint decides
    python examples/agent_loop.py --blocks              # the demo model clicks numbered blocks

The scripted policy reads the app's layout (an oracle standing in for the model's eyes) and writes
its clicks in the model's coordinate space for the screenshot it was shown, exactly as a model
would, so the whole path (tool prompt, parsing, coordinate mapping) is exercised.

``--blocks`` is a second screen where the bundled demo model is the policy: a pyramid of numbered
blocks and the task "click the blocks in order of their numbers". The model reads the screen
(its ``list`` skill), then for each number in turn is asked, with the ``computer_use`` tool, to
click that block; the screen records which block each click hit, the tool's result goes back to
the model, which confirms.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from qwenvl.agents import (
    Action,
    Click,
    Key,
    Screen,
    SystemButton,
    Terminate,
    Type,
    agent_system_prompt,
    computer_use_tool,
    mobile_use_tool,
    parse_actions,
)
from qwenvl.errors import ActionError
from qwenvl.processing.image import VisionPreprocessConfig
from qwenvl.tool_calls import format_tool_call

Box = tuple[int, int, int, int]


# ---------------------------------------------------------------------------------------------
# The simulated screen


@dataclass
class SimulatedScreen:
    """A one-form app: clicking the field focuses it, typing fills it, "Submit" submits the text
    (when there is some), "Clear" empties it. Every click is recorded in screen pixels."""

    width: int = 1920
    height: int = 1080
    text: str = ""
    focused: bool = False
    submitted: str | None = None
    clicks: list[tuple[int, int]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    @property
    def elements(self) -> dict[str, Box]:
        w, h = self.width, self.height
        return {
            "field": (w * 30 // 100, h * 35 // 100, w * 70 // 100, h * 45 // 100),
            "Submit": (w * 30 // 100, h * 55 // 100, w * 47 // 100, h * 65 // 100),
            "Clear": (w * 53 // 100, h * 55 // 100, w * 70 // 100, h * 65 // 100),
        }

    def center(self, name: str) -> tuple[int, int]:
        x1, y1, x2, y2 = self.elements[name]
        return (x1 + x2) // 2, (y1 + y2) // 2

    def element_at(self, x: int, y: int) -> str | None:
        for name, (x1, y1, x2, y2) in self.elements.items():
            if x1 <= x < x2 and y1 <= y < y2:
                return name
        return None

    def screenshot(self) -> Image.Image:
        image = Image.new("RGB", (self.width, self.height), (236, 236, 240))
        canvas = ImageDraw.Draw(image)
        fx1, fy1, fx2, fy2 = self.elements["field"]
        canvas.rectangle((fx1, fy1, fx2, fy2), fill=(255, 255, 255), outline=(60, 60, 60), width=3)
        shown = self.text or ("|" if self.focused else "Type here")
        canvas.text((fx1 + 12, fy1 + 12), shown, fill=(0, 0, 0) if self.text else (150, 150, 150))
        for name, colour in (("Submit", (40, 120, 220)), ("Clear", (200, 70, 70))):
            x1, y1, x2, y2 = self.elements[name]
            canvas.rectangle((x1, y1, x2, y2), fill=colour)
            canvas.text((x1 + 12, y1 + 12), name, fill=(255, 255, 255))
        if self.submitted is not None:
            canvas.text((fx1, fy2 + 20), f"Submitted: {self.submitted}", fill=(0, 120, 0))
        return image

    def apply(self, action: Action) -> str:
        """Apply one action; returns what happened (for the history and the log)."""
        if isinstance(action, Click) and action.x is not None and action.y is not None:
            self.clicks.append((action.x, action.y))
            target = self.element_at(action.x, action.y)
            self.focused = target == "field"
            if target == "Submit" and self.text:
                self.submitted = self.text
            elif target == "Clear":
                self.text = ""
            result = f"clicked {target or 'nothing'} at ({action.x}, {action.y})"
        elif isinstance(action, Type):
            if self.focused:
                self.text += action.text
                result = f"typed {action.text!r}"
            else:
                result = "typed, but no field has focus"
        elif isinstance(action, (Key, SystemButton)) and self.focused:
            keys = action.keys if isinstance(action, Key) else (action.button,)
            if any(k.lower() in ("enter", "return") for k in keys) and self.text:
                self.submitted = self.text
            result = f"pressed {'+'.join(keys)}"
        else:
            result = f"{type(action).__name__} (no effect here)"
        self.log.append(result)
        return result


# ---------------------------------------------------------------------------------------------
# Policies: (messages, screen) -> model text


Policy = Callable[[list[dict[str, Any]], Screen], str]


@dataclass
class ScriptedPolicy:
    """Plays the model: focus the field, type ``text``, click Submit, terminate; writes each
    step as the cookbook's tool-call text in the model's coordinate space."""

    app: SimulatedScreen
    text: str = "hello"
    mobile: bool = False

    def _call(self, **arguments: Any) -> str:
        return format_tool_call("mobile_use" if self.mobile else "computer_use", arguments)

    def _click(self, name: str, screen: Screen) -> str:
        x, y = screen.to_model(*self.app.center(name))
        action = "click" if self.mobile else "left_click"
        return self._call(action=action, coordinate=[x, y])

    def __call__(self, messages: list[dict[str, Any]], screen: Screen) -> str:
        if self.app.submitted is not None:
            return "The form is submitted.\n" + self._call(action="terminate", status="success")
        if not self.app.focused and self.app.text != self.text:
            return "I will click the text field first.\n" + self._click("field", screen)
        if self.app.text != self.text:
            return self._call(action="type", text=self.text)
        return self._click("Submit", screen)


class LLMPolicy:
    """A real model: greedy chat on the messages (system prompt with the tool, screenshot)."""

    def __init__(self, llm: Any, max_tokens: int = 128) -> None:
        from qwenvl import SamplingParams

        self.llm = llm
        self.params = SamplingParams(temperature=0, max_tokens=max_tokens)

    def __call__(self, messages: list[dict[str, Any]], screen: Screen) -> str:
        (result,) = self.llm.chat(messages, self.params)
        geometry = result.images[-1]
        if geometry != screen.geometry:  # the processor resized differently than planned
            raise RuntimeError(f"screenshot geometry {geometry} != planned {screen.geometry}")
        return result.outputs[0].text


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class Step:
    text: str  # what the policy wrote
    actions: list[Action]
    results: list[str]
    error: str | None = None


def build_messages(
    task: str, screenshot: Image.Image, tool: dict[str, Any], history: list[str]
) -> list[dict[str, Any]]:
    """The cookbook layout: system prompt with the tool, then the task, history and screenshot."""
    text = f"The user query: {task}"
    if history:
        text += "\nTask progress (You have done the following operation on the current device): "
        text += "; ".join(f"Step{i + 1}: {h}" for i, h in enumerate(history))
    return [
        {"role": "system", "content": agent_system_prompt([tool])},
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image", "image": screenshot}],
        },
    ]


def run_agent(
    app: SimulatedScreen,
    policy: Policy,
    task: str,
    family: str,
    *,
    vision: Any = None,
    mobile: bool = False,
    max_steps: int = 8,
    save_dir: Path | None = None,
) -> list[Step]:
    """Run ``policy`` on ``app`` until it terminates or ``max_steps`` pass."""
    steps: list[Step] = []
    history: list[str] = []
    for k in range(max_steps):
        shot = app.screenshot()
        if save_dir is not None:
            shot.save(save_dir / f"step{k:02d}.png")
        screen = Screen.for_screenshot(app.width, app.height, family, vision)
        tool = mobile_use_tool(screen) if mobile else computer_use_tool(screen)
        text = policy(build_messages(task, shot, tool, history), screen)
        try:
            actions = parse_actions(text, screen)
        except ActionError as e:
            steps.append(Step(text, [], [], str(e)))
            history.append(f"invalid action ({e})")
            continue
        results = [app.apply(a) for a in actions if not isinstance(a, Terminate)]
        steps.append(Step(text, actions, results))
        history.extend(results)
        if any(isinstance(a, Terminate) for a in actions):
            break
    return steps


# ---------------------------------------------------------------------------------------------
# The block world: the demo model as the policy


@dataclass
class BlockScreen:
    """A demo scene as a screen: a click hits the block under it (or nothing)."""

    scene: Any
    hits: list[int | None] = field(default_factory=list)

    def screenshot(self) -> Image.Image:
        from qwenvl.demo.scenes import render

        return render(self.scene)

    def apply(self, action: Action) -> str:
        if not isinstance(action, Click) or action.x is None or action.y is None:
            return f"{type(action).__name__} (no effect here)"
        under = [b.number for b in self.scene.blocks if _inside(b.box, action.x, action.y)]
        self.hits.append(under[0] if under else None)
        return f"Clicked at ({action.x}, {action.y})."


def _inside(box: Box, x: int, y: int) -> bool:
    return box[0] <= x < box[2] and box[1] <= y < box[3]


def run_blocks(llm: Any, world: BlockScreen) -> list[str]:
    """Click the blocks in order of their numbers; returns the transcript's lines."""
    from qwenvl import SamplingParams
    from qwenvl.demo.tasks import LIST_PROMPT, click_tool, demo_screen, parse_list

    greedy = SamplingParams(temperature=0, max_tokens=96)
    shot = world.screenshot()
    screen = demo_screen(shot.width, shot.height)
    look = [{"type": "image", "image": shot}, {"type": "text", "text": LIST_PROMPT}]
    seen = llm.chat([{"role": "user", "content": look}], greedy)[0].outputs[0].text
    order = sorted(n for _, n in parse_list(seen))
    lines = [f"the model sees: {seen!r} -> order {order}"]
    for n in order:
        ask = {"type": "text", "text": f"Click the box with the number {n}."}
        chat = [{"role": "user", "content": [{"type": "image", "image": shot}, ask]}]
        out = llm.chat(chat, greedy, tools=[click_tool()])[0].outputs[0]
        try:
            actions = parse_actions(out, screen)
        except ActionError as e:
            lines.append(f"  {n}: no action ({e}): {out.text!r}")
            continue
        result = world.apply(actions[0])
        calls = [
            {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in out.tool_calls or []
        ]
        chat.append({"role": "assistant", "content": "", "tool_calls": calls})
        chat.append({"role": "tool", "content": result})
        reply = llm.chat(chat, greedy, tools=[click_tool()])[0].outputs[0].text
        lines.append(f"  {n}: {actions[0]} hit block {world.hits[-1]}; the model: {reply!r}")
    return lines


def main_blocks(seed: int) -> int:
    import random

    from qwenvl import LLM
    from qwenvl.demo.scenes import random_scene

    world = BlockScreen(random_scene(random.Random(seed), 6))
    for line in run_blocks(LLM(), world):
        print(line)
    want = sorted(b.number for b in world.scene.blocks)
    print(f"blocks hit, in order: {world.hits}; wanted {want}")
    return 0 if world.hits == want else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", metavar="DIR", help="use this checkpoint instead of a script")
    parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--mobile", action="store_true", help="the mobile_use action space")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument(
        "--max-pixels", type=int, help="screenshot pixel limit (e.g. 1003520 = 1280*28*28)"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--text", default="hello", help="what to type into the field")
    parser.add_argument("--save-dir", type=Path, help="save each screenshot here")
    parser.add_argument("--blocks", action="store_true", help="the demo model on a block world")
    parser.add_argument("--seed", type=int, default=1, help="the block world's scene")
    args = parser.parse_args(argv)
    if args.blocks:
        return main_blocks(args.seed)

    app = SimulatedScreen(args.width, args.height)
    task = f"Type '{args.text}' into the text field and submit the form."
    family = args.family
    vision = VisionPreprocessConfig(max_pixels=args.max_pixels) if args.max_pixels else None
    policy: Policy
    if args.model:
        from qwenvl import LLM

        llm = LLM(args.model, max_pixels=args.max_pixels)
        family, vision = llm.config.family, llm.processor.vision
        policy = LLMPolicy(llm)
    else:
        policy = ScriptedPolicy(app, args.text, args.mobile)
    if args.save_dir:
        args.save_dir.mkdir(parents=True, exist_ok=True)
    steps = run_agent(
        app,
        policy,
        task,
        family,
        vision=vision,
        mobile=args.mobile,
        max_steps=args.steps,
        save_dir=args.save_dir,
    )
    for k, step in enumerate(steps, 1):
        print(f"step {k}: {step.text!r}")
        for action, result in zip(step.actions, step.results):
            print(f"    {action} -> {result}")
        if step.error:
            print(f"    error: {step.error}")
    print(f"field: {app.text!r}; submitted: {app.submitted!r}")
    return 0 if app.submitted == args.text else 1


if __name__ == "__main__":
    sys.exit(main())
