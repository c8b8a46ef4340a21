"""The demo's tasks: a scene (or two, or a clip) -> a question and the one right answer.

(a) ``list``: colour and number of every block, row by row from the top; (b) ``count``;
(c) ``number``: the number on the block of a unique colour; (d) ``ground``: the box of the block
with number N, in Qwen2.5-VL's JSON convention (``bbox_2d`` in resized-image pixels); (e)
``compare``: which of two images has more blocks; (f) ``when``: in a clip where blocks appear one
by one, the second at which the block with number N appears; (g) ``click``: given the cookbook's
``computer_use`` tool, a ``left_click`` tool call at the centre of the block with number N (model
coordinates), then, once the tool's result comes back, a short confirmation.

Every sample is a pure function of ``(seed, index)``; ``write_jsonl`` writes them in the format
``qwenvl train`` reads.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from qwenvl.agents import Screen, computer_use_tool
from qwenvl.demo.scenes import COLOUR_NAMES, SCALE, SIDE, Scene, random_scene, render
from qwenvl.grounding import grounding_prompt
from qwenvl.processing.chat_template import DEFAULT_SYSTEM_PROMPT, format_tools_block
from qwenvl.processing.image import smart_resize
from qwenvl.tool_calls import format_tool_call

TASKS = ("list", "count", "number", "ground", "compare", "when")
TOOL_TASKS = ("click",)  # kept apart: TASKS also seeds the tokenizer's corpus
EVAL_TASKS = TASKS + TOOL_TASKS
LIST_PROMPT = "Output the color and number of each box."
COUNT_PROMPT = "How many boxes are there?"
COMPARE_PROMPT = "Which image has more boxes?"
MODEL_TYPE = "qwen2_5_vl"  # the demo model is a small Qwen2.5-VL: it grounds in JSON

# The demo checkpoint's pixel limits (preprocessor_config.json): a 280 px scene is seen at half
# size, 140 px (5 x 5 vision tokens, one per block cell); clips are drawn at 224 px and seen at
# 112 (16 tokens per second of clip).
MIN_PIXELS = 56 * 56
MAX_PIXELS = (SIDE // SCALE) ** 2
VIDEO_SIDE = 112
VIDEO_FPS = 2.0
VIDEO_OPTIONS = {"fps": VIDEO_FPS, "resized_height": VIDEO_SIDE, "resized_width": VIDEO_SIDE}


def number_prompt(colour: str) -> str:
    return f"What is the number on the {colour} box?"


def ground_phrase(number: int) -> str:
    return f"the box with the number {number}"


def when_prompt(number: int) -> str:
    return f"At what second does the box with the number {number} appear?"


# How people ask for a click, and what a tool may answer (the second turn's input).
CLICK_PROMPTS = (
    "Click the box with the number {n}.",
    "Click the block with number {n}.",
    "Click on the box with the number {n}.",
    "Please click the block with the number {n}.",
)
TOOL_RESULTS = (
    "Clicked at ({x}, {y}).",
    "done",
    "ok",
    '{{"status": "success"}}',
    "The click was performed.",
)


def click_confirmation(number: int) -> str:
    return f"I clicked the box with the number {number}."


def demo_screen(width: int = SIDE, height: int = SIDE) -> Screen:
    """A scene as a screen: the model's coordinates are pixels of the half-size image it sees."""
    return Screen.for_screenshot(
        width, height, family=MODEL_TYPE, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )


def click_tool(style: str = "openai") -> dict[str, Any]:
    """The ``computer_use`` tool for a scene, as an OpenAI client sends it (``openai``: name,
    description, parameters) or as the cookbooks' qwen-agent prompt writes it (``cookbook``)."""
    tool = computer_use_tool(demo_screen())
    if style == "cookbook":
        return tool
    f = tool["function"]
    return {
        "type": "function",
        "function": {k: f[k] for k in ("name", "description", "parameters")},
    }


def tool_system_prompt(style: str = "openai") -> str:
    """The system message the chat template writes for ``tools=[click_tool(style)]``."""
    return DEFAULT_SYSTEM_PROMPT + format_tools_block([click_tool(style)])


@dataclass
class DemoSample:
    """One question with its media and answer; ``info`` keeps what evaluation needs."""

    task: str
    images: list[Image.Image]
    video: list[Image.Image] | None
    question: str
    answer: str
    info: dict[str, Any] = field(default_factory=dict)
    system: str | None = None  # a system message (the tools block, for ``click``)
    call: dict[str, Any] | None = None  # the answer is this tool call (``answer``: its text)
    follow_up: list[dict[str, Any]] = field(default_factory=list)  # the tool's result, a reply

    def messages(self, with_answer: bool = True) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "image", "image": im} for im in self.images]
        if self.video is not None:
            content.append({"type": "video", "video": self.video, **VIDEO_OPTIONS})
        content.append({"type": "text", "text": self.question})
        out: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if self.system is not None:
            out.insert(0, {"role": "system", "content": self.system})
        if with_answer:
            if self.call is not None:
                call = {"type": "function", "function": self.call}
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            else:
                out.append({"role": "assistant", "content": self.answer})
            out += self.follow_up
        return out


def list_answer(scene: Scene) -> str:
    return "\n".join(", ".join(f"{b.colour} {b.number}" for b in row) for row in scene.rows)


def resized_box(scene: Scene, number: int) -> list[int]:
    """The block's box in pixels of the image the model sees (the processor's resize)."""
    h, w = smart_resize(scene.height, scene.width, 28, MIN_PIXELS, MAX_PIXELS)
    x1, y1, x2, y2 = scene.by_number(number).box
    sx, sy = w / scene.width, h / scene.height
    return [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]


def ground_answer(box: Sequence[int], number: int) -> str:
    inner = json.dumps({"bbox_2d": list(box), "label": ground_phrase(number)})
    return f"```json\n[\n\t{inner}\n]\n```"


def make_sample(task: str, rng: random.Random, max_blocks: int = 10) -> DemoSample:
    """One sample of ``task``; ``max_blocks`` < 10 gives the easier scenes of a curriculum."""
    if task == "list":
        s = random_scene(rng, rng.randint(1, max_blocks))
        return DemoSample(task, [render(s)], None, LIST_PROMPT, list_answer(s), {"scene": s})
    if task == "count":
        s = random_scene(rng, rng.randint(1, max_blocks))
        return DemoSample(task, [render(s)], None, COUNT_PROMPT, str(len(s.blocks)), {"scene": s})
    if task == "number":
        s = random_scene(rng, rng.randint(1, max_blocks))
        unique = [b for b in s.blocks if sum(c.colour == b.colour for c in s.blocks) == 1]
        if not unique:  # recolour one block with a colour nobody else has
            free = [c for c in COLOUR_NAMES if all(b.colour != c for b in s.blocks)]
            i = rng.randrange(len(s.blocks))
            blocks = list(s.blocks)
            blocks[i] = replace(blocks[i], colour=rng.choice(free))
            s = replace(s, blocks=tuple(blocks))
            unique = [blocks[i]]
        b = rng.choice(unique)
        return DemoSample(
            task, [render(s)], None, number_prompt(b.colour), str(b.number), {"scene": s}
        )
    if task == "ground":
        s = random_scene(rng, rng.randint(1, max_blocks))
        n = rng.choice(s.blocks).number
        box = resized_box(s, n)
        q = grounding_prompt(ground_phrase(n), MODEL_TYPE)
        return DemoSample(
            task, [render(s)], None, q, ground_answer(box, n), {"scene": s, "number": n}
        )
    if task == "compare":
        a, b = rng.sample(range(1, max_blocks + 1), 2) if max_blocks > 1 else (1, 2)
        s1, s2 = random_scene(rng, a), random_scene(rng, b)
        answer = "The first image." if a > b else "The second image."
        return DemoSample(
            task, [render(s1), render(s2)], None, COMPARE_PROMPT, answer, {"scenes": (s1, s2)}
        )
    if task == "when":
        seconds = rng.randint(3, 8)
        n = rng.randint(1, min(seconds, 6, max_blocks))
        s = random_scene(rng, n, size=(SCALE * VIDEO_SIDE, SCALE * VIDEO_SIDE))
        times = sorted(rng.sample(range(seconds), n))
        order = list(range(n))
        rng.shuffle(order)  # block order[k] appears at times[k]
        appear = {order[k]: times[k] for k in range(n)}
        frames, shown_per_frame = [], []
        for f in range(int(seconds * VIDEO_FPS)):
            t = f / VIDEO_FPS
            shown = [i for i in range(n) if appear[i] <= t]
            shown_per_frame.append(shown)
            frames.append(_render_subset(s, shown))
        i = rng.randrange(n)
        number = s.blocks[i].number
        return DemoSample(
            task,
            [],
            frames,
            when_prompt(number),
            str(appear[i]),
            {"scene": s, "second": appear[i], "shown": shown_per_frame, "number": number},
        )
    if task == "click":
        return click_sample(rng, max_blocks)
    raise ValueError(f"unknown task {task!r}; expected one of {EVAL_TASKS}")


def click_sample(rng: random.Random, max_blocks: int = 10) -> DemoSample:
    """``click``: the tool call on the named block; half the samples go on to the tool's result
    and the confirmation. The tool comes as either client writes it (``click_tool``)."""
    s = random_scene(rng, rng.randint(1, max_blocks))
    n = rng.choice(s.blocks).number
    x1, y1, x2, y2 = resized_box(s, n)
    x, y = (x1 + x2) // 2, (y1 + y2) // 2
    call = {"name": "computer_use", "arguments": {"action": "left_click", "coordinate": [x, y]}}
    style = rng.choice(("openai", "cookbook"))
    follow_up = []
    if rng.random() < 0.5:
        result = rng.choice(TOOL_RESULTS).format(x=x, y=y)
        follow_up = [
            {"role": "tool", "content": result},
            {"role": "assistant", "content": click_confirmation(n)},
        ]
    question = rng.choice(CLICK_PROMPTS).format(n=n)
    info = {"scene": s, "number": n, "style": style}
    answer = format_tool_call(call["name"], call["arguments"])  # what the model writes
    return DemoSample(
        "click",
        [render(s)],
        None,
        question,
        answer,
        info,
        tool_system_prompt(style),
        call,
        follow_up,
    )


def _render_subset(scene: Scene, shown: list[int]) -> Image.Image:
    return render(replace(scene, blocks=tuple(scene.blocks[i] for i in shown)))


def sample_at(seed: int, index: int, tasks: Sequence[str] = TASKS, **kw: Any) -> DemoSample:
    """Sample ``index`` of the stream ``seed``: the task cycles, the scene is random."""
    rng = random.Random(f"{seed}:{index}")
    return make_sample(tasks[index % len(tasks)], rng, **kw)


def write_jsonl(out: str | Path, count: int, seed: int, tasks: Sequence[str] = TASKS) -> Path:
    """Write ``count`` samples as images/frames + ``data.jsonl`` (the ``qwenvl train`` format)."""
    out = Path(out)
    (out / "media").mkdir(parents=True, exist_ok=True)
    with open(out / "data.jsonl", "w") as f:
        for i in range(count):
            s = sample_at(seed, i, tasks)
            content: list[dict[str, Any]] = []
            for k, im in enumerate(s.images):
                name = f"media/{i:06d}_{k}.png"
                im.save(out / name)
                content.append({"type": "image", "image": name})
            if s.video is not None:
                names = []
                for k, im in enumerate(s.video):
                    name = f"media/{i:06d}_f{k:02d}.png"
                    im.save(out / name)
                    names.append(name)
                content.append({"type": "video", "video": names, **VIDEO_OPTIONS})
            content.append({"type": "text", "text": s.question})
            record = {
                "messages": [
                    {"role": "user", "content": content},
                    {"role": "assistant", "content": s.answer},
                ]
            }
            f.write(json.dumps(record) + "\n")
    return out / "data.jsonl"


# --- reading answers back ------------------------------------------------------------------------
_ITEM = re.compile(r"([a-z]+)\s+(\d)")


def parse_list(text: str) -> list[tuple[str, int]]:
    """``"red 7\\nblue 2, green 5"`` -> ``[("red", 7), ("blue", 2), ("green", 5)]``."""
    return [(c, int(n)) for c, n in _ITEM.findall(text.lower())]


def parse_int(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None
