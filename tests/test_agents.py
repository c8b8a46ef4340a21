"""qwenvl.agents: screens and coordinate spaces, the cookbook tools, parsing realistic (and
malformed) agent outputs, and the example agent loop against a simulated screen."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fixed_output import fix_output_text
from qwenvl.agents import (
    COMPUTER_ACTIONS,
    MOBILE_ACTIONS,
    Click,
    Drag,
    Key,
    LongPress,
    MouseMove,
    Open,
    Screen,
    Scroll,
    Swipe,
    SystemButton,
    Terminate,
    Type,
    Wait,
    agent_system_prompt,
    computer_use_tool,
    mobile_use_tool,
    parse_action,
    parse_actions,
)
from qwenvl.errors import ActionError, QwenVLError
from qwenvl.outputs import CompletionOutput
from qwenvl.processing.chat_template import render_chat
from qwenvl.processing.image import VisionPreprocessConfig
from qwenvl.tool_calls import ToolCall, format_tool_call

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent_loop.py"
COOKBOOK_LIMITS = VisionPreprocessConfig(max_pixels=1280 * 28 * 28)
# 1920x1080 under max_pixels 1280*28*28: beta = sqrt(1920*1080/1003520) = 1.4375,
# h = floor(1080/1.4375/28)*28 = 728, w = floor(1920/1.4375/28)*28 = 1316.
DESKTOP = Screen.for_screenshot(1920, 1080, "qwen2_5_vl", COOKBOOK_LIMITS)
DESKTOP_V2 = Screen.for_screenshot(1920, 1080, "qwen2_vl", COOKBOOK_LIMITS)
PHONE = Screen.for_screenshot(1080, 2400, "qwen2_5_vl")  # released limits: 1092x2408


def call(name: str, **arguments) -> str:
    return format_tool_call(name, arguments)


def load_example():
    spec = importlib.util.spec_from_file_location("agent_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["agent_loop"] = module
    spec.loader.exec_module(module)
    return module


# --- screens ---------------------------------------------------------------------------------


def test_screen_spaces():
    assert (DESKTOP.width, DESKTOP.height) == (1920, 1080)
    assert DESKTOP.space == "resized" and DESKTOP.model_size == (1316, 728)
    assert DESKTOP_V2.space == "norm1000" and DESKTOP_V2.model_size == (1000, 1000)
    assert PHONE.model_size == (1092, 2408)
    # x 658/1316*1920 = 960, y 364/728*1080 = 540; Qwen2-VL: 500/1000*1920, 500/1000*1080.
    assert DESKTOP.to_screen(658, 364) == (960, 540)
    assert DESKTOP_V2.to_screen(500, 500) == (960, 540)
    assert DESKTOP.to_screen(1316, 728) == (1919, 1079)  # clamped onto the screen
    assert DESKTOP.to_screen(-5, 9999) == (0, 1079)
    assert DESKTOP.to_model(960, 540) == (658, 364)
    assert DESKTOP_V2.to_model(960, 540) == (500, 500)
    with pytest.raises(ValueError):
        Screen(DESKTOP.geometry, "qwen3")


def test_screen_from_llm_matches_the_processor(llms):
    from PIL import Image

    from qwenvl import SamplingParams

    llm = llms("qwen2_5_vl")
    screen = Screen.from_llm(llm, 333, 1001)
    conv = [
        {"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (333, 1001))}]}
    ]
    (out,) = llm.chat(conv, SamplingParams(max_tokens=1))
    assert out.images[0] == screen.geometry


# --- tools and prompt ------------------------------------------------------------------------


def test_tools_state_the_model_space_resolution():
    tool = computer_use_tool(DESKTOP)
    fn = tool["function"]
    assert tool["type"] == "function" and fn["name"] == "computer_use"
    assert "The screen's resolution is 1316x728." in fn["description"]
    assert fn["parameters"]["properties"]["action"]["enum"] == list(COMPUTER_ACTIONS)
    assert fn["parameters"]["required"] == ["action"]
    assert "resolution is 1000x1000" in computer_use_tool(DESKTOP_V2)["function"]["description"]
    mobile = mobile_use_tool(PHONE)["function"]
    assert "The screen's resolution is 1092x2408." in mobile["description"]
    assert mobile["parameters"]["properties"]["action"]["enum"] == list(MOBILE_ACTIONS)
    assert mobile["parameters"]["properties"]["button"]["enum"] == ["Back", "Home", "Menu", "Enter"]
    assert list(fn)[0] == "name_for_human" and fn["args_format"].startswith("Format the arg")


def test_system_prompt_equals_chat_with_tools():
    tool = mobile_use_tool(PHONE)
    system = agent_system_prompt([tool])
    assert system.startswith("You are a helpful assistant.\n\n# Tools\n\n")
    assert json.dumps(tool, ensure_ascii=False) in system
    assert system.endswith(
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
    user = {"role": "user", "content": "Open settings"}
    with_system = render_chat(
        "{% for m in messages %}{{ m.content }}|{% endfor %}",
        [{"role": "system", "content": system}, user],
    )
    with_tools = render_chat(
        "{% for m in messages %}{{ m.content }}|{% endfor %}", [user], tools=[tool]
    )
    assert with_system == with_tools
    assert agent_system_prompt([tool["function"]], system="Be brief.").startswith("Be brief.\n\n")


# --- parsing ---------------------------------------------------------------------------------

# (model output, screen, expected actions) — realistic replies of both action spaces.
GOOD = [
    (call("computer_use", action="left_click", coordinate=[658, 364]), DESKTOP, [Click(960, 540)]),
    (
        "I need to open the browser.\n"
        + call("computer_use", action="double_click", coordinate=[329, 182]),
        DESKTOP,
        [Click(480, 270, "left", 2)],
    ),
    (
        call("computer_use", action="right_click", coordinate=[0, 0]),
        DESKTOP,
        [Click(0, 0, "right")],
    ),
    (call("computer_use", action="middle_click"), DESKTOP, [Click(None, None, "middle")]),
    (
        call("computer_use", action="mouse_move", coordinate=[500, 250]),
        DESKTOP_V2,
        [MouseMove(960, 270)],
    ),
    (
        call("computer_use", action="left_click_drag", coordinate=[1316, 364]),
        DESKTOP,
        [Drag(1919, 540)],
    ),
    (call("computer_use", action="type", text="hello 世界\n"), DESKTOP, [Type("hello 世界\n")]),
    (call("computer_use", action="key", keys=["ctrl", "c"]), DESKTOP, [Key(("ctrl", "c"))]),
    (
        call("computer_use", action="key", keys="ctrl+shift+t"),
        DESKTOP,
        [Key(("ctrl", "shift", "t"))],
    ),
    (call("computer_use", action="scroll", pixels=-300), DESKTOP, [Scroll(-300.0)]),
    (
        call("computer_use", action="scroll", pixels=5, coordinate=[658, 364]),
        DESKTOP,
        [Scroll(5.0, 960, 540)],
    ),
    (call("computer_use", action="wait", time=2), DESKTOP, [Wait(2.0)]),
    (call("computer_use", action="terminate", status="success"), DESKTOP, [Terminate("success")]),
    (call("mobile_use", action="click", coordinate=[546, 1204]), PHONE, [Click(540, 1200)]),
    (
        call("mobile_use", action="long_press", coordinate=[546, 1204], time=2),
        PHONE,
        [LongPress(540, 1200, 2.0)],
    ),
    (
        call("mobile_use", action="swipe", coordinate=[546, 1806], coordinate2=[546, 602]),
        PHONE,
        [Swipe(540, 1800, 540, 600)],
    ),
    (call("mobile_use", action="system_button", button="back"), PHONE, [SystemButton("Back")]),
    (call("mobile_use", action="open", text="Settings"), PHONE, [Open("Settings")]),
    (call("mobile_use", action="key", text="volume_up"), PHONE, [Key(("volume_up",))]),
    (call("mobile_use", action="terminate", status="failure"), PHONE, [Terminate("failure")]),
    # Variants models write: string coordinates, numbers as strings, stringified arguments,
    # no tags at all, a missing closing tag, several calls in one reply.
    (call("mobile_use", action="click", coordinate="(546, 1204)"), PHONE, [Click(540, 1200)]),
    (call("mobile_use", action="click", coordinate=["546", "1204"]), PHONE, [Click(540, 1200)]),
    (
        '<tool_call>\n{"name": "mobile_use", "arguments": "{\\"action\\": \\"wait\\", '
        '\\"time\\": 1}"}\n</tool_call>',
        PHONE,
        [Wait(1.0)],
    ),
    ('{"name": "computer_use", "arguments": {"action": "wait", "time": 3}}', DESKTOP, [Wait(3.0)]),
    (
        'Action: ```json\n{"action": "left_click", "coordinate": [658, 364]}\n```',
        DESKTOP,
        [Click(960, 540)],
    ),
    (
        '<tool_call>\n{"name": "computer_use", "arguments": {"action": "type", "text": "x"}}\n',
        DESKTOP,
        [Type("x")],
    ),
    (
        call("computer_use", action="left_click", coordinate=[500, 400])
        + "\n"
        + call("computer_use", action="type", text="hi"),
        DESKTOP_V2,
        [Click(960, 432), Type("hi")],
    ),
]


@pytest.mark.parametrize(("text", "screen", "expected"), GOOD)
def test_parse_realistic_outputs(text, screen, expected):
    assert parse_actions(text, screen) == expected


BAD = [
    ("I think the task is done.", "no tool call"),
    ("", "no tool call"),
    (
        '<tool_call>\n{"name": "computer_use", "arguments": {"action": "left_click", '
        '"coordinate": [1, }\n</tool_call>',
        "malformed",
    ),
    (
        call("computer_use", action="triple_click", coordinate=[1, 2]),
        "unknown computer_use action 'triple_click'",
    ),
    (
        call("mobile_use", action="left_click", coordinate=[1, 2]),
        "unknown mobile_use action 'left_click'",
    ),
    (call("browser", action="click"), "unknown tool 'browser'"),
    (call("computer_use", coordinate=[1, 2]), "no 'action'"),
    (call("mobile_use", action="click"), "needs the argument 'coordinate'"),
    (call("mobile_use", action="swipe", coordinate=[1, 2]), "needs the argument 'coordinate2'"),
    (call("computer_use", action="left_click_drag"), "needs the argument 'coordinate'"),
    (call("computer_use", action="mouse_move", coordinate=[1, 2, 3]), "must be [x, y]"),
    (call("computer_use", action="mouse_move", coordinate=["a", "b"]), "must be a number"),
    (call("computer_use", action="mouse_move", coordinate="center"), "must be [x, y]"),
    (call("computer_use", action="type"), "needs the argument 'text'"),
    (call("computer_use", action="key"), "needs the argument 'keys'"),
    (call("computer_use", action="key", keys=[]), "keys must be a list"),
    (call("computer_use", action="scroll"), "needs the argument 'pixels'"),
    (call("computer_use", action="wait"), "needs the argument 'time'"),
    (call("mobile_use", action="wait", time=-1), "must not be negative"),
    (
        call("mobile_use", action="terminate", status="done"),
        "status must be one of success, failure",
    ),
    (call("mobile_use", action="system_button", button="Power"), "button must be one of"),
    (call("mobile_use", action="long_press", coordinate=[1, 2]), "needs the argument 'time'"),
]


@pytest.mark.parametrize(("text", "match"), BAD)
def test_parse_malformed_outputs_raise_action_error(text, match):
    with pytest.raises(ActionError, match=match.replace("[", r"\[").replace("]", r"\]")) as info:
        parse_actions(text, DESKTOP if "computer" in text else PHONE)
    assert isinstance(info.value, QwenVLError) and isinstance(info.value, ValueError)


def test_parse_action_call_shapes():
    expected = Click(960, 540)
    args = {"action": "left_click", "coordinate": [658, 364]}
    assert parse_action(ToolCall("computer_use", args), DESKTOP) == expected
    assert parse_action({"name": "computer_use", "arguments": args}, DESKTOP) == expected
    wire = ToolCall("computer_use", args).to_openai()
    assert parse_action(wire, DESKTOP) == expected
    assert parse_action(args, DESKTOP) == expected  # the arguments object alone
    with pytest.raises(ActionError, match="not valid JSON"):
        parse_action({"function": {"name": "computer_use", "arguments": "{oops"}}, DESKTOP)
    with pytest.raises(ActionError, match="must be a JSON object"):
        parse_action({"name": "computer_use", "arguments": [1]}, DESKTOP)
    # A CompletionOutput: its tool_calls when set, else its text.
    out = CompletionOutput(0, call("computer_use", **args), [])
    assert parse_actions(out, DESKTOP) == [expected]
    out.tool_calls = [ToolCall("computer_use", {"action": "wait", "time": 1})]
    assert parse_actions(out, DESKTOP) == [Wait(1.0)]


# --- the example loop ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("mobile", [False, True])
def test_example_loop_clicks_land_on_the_buttons(family, mobile):
    ex = load_example()
    app = ex.SimulatedScreen(1920, 1080)
    policy = ex.ScriptedPolicy(app, "hello", mobile=mobile)
    steps = ex.run_agent(
        app, policy, "type hello and submit", family, vision=COOKBOOK_LIMITS, mobile=mobile
    )
    assert app.submitted == "hello" and app.text == "hello"
    assert isinstance(steps[-1].actions[-1], Terminate) and len(steps) == 4
    assert all(step.error is None for step in steps)
    clicks = [a for step in steps for a in step.actions if isinstance(a, Click)]
    assert [(c.x, c.y) for c in clicks] == app.clicks
    # The model wrote coordinates in its own space; they landed at the element centres in
    # real 1920x1080 pixels: field (960, 432) and Submit (739, 648), to within a pixel.
    screen = Screen.for_screenshot(1920, 1080, family, COOKBOOK_LIMITS)
    first = json.loads(steps[0].text.split("<tool_call>\n")[1].split("\n</tool_call>")[0])
    written = first["arguments"]["coordinate"]
    if family == "qwen2_5_vl":
        assert screen.model_size == (1316, 728)
        assert written == [658, 291]  # 960*1316/1920, 432*728/1080 = 291.2
    else:
        assert written == [500, 400]  # 960/1920*1000, 432/1080*1000
    assert app.element_at(*app.clicks[0]) == "field" and app.element_at(*app.clicks[1]) == "Submit"
    assert abs(app.clicks[0][0] - 960) <= 1 and abs(app.clicks[0][1] - 432) <= 1
    assert abs(app.clicks[1][0] - 739) <= 1 and abs(app.clicks[1][1] - 648) <= 1


def test_example_loop_survives_bad_actions():
    ex = load_example()
    app = ex.SimulatedScreen(800, 600)
    replies = iter(
        [
            "I am not sure.",
            call("computer_use", action="fly"),
            call("computer_use", action="terminate", status="failure"),
        ]
    )
    steps = ex.run_agent(app, lambda messages, screen: next(replies), "t", "qwen2_5_vl")
    assert [s.error is not None for s in steps] == [True, True, False]
    assert steps[-1].actions == [Terminate("failure")]


def test_example_main_runs_without_weights(capsys):
    ex = load_example()
    assert ex.main(["--max-pixels", str(1280 * 28 * 28)]) == 0
    assert "submitted: 'hello'" in capsys.readouterr().out


def hf_greedy_text(hf, llm, result, screenshot, max_new_tokens: int) -> str:
    """transformers' greedy reply to the prompt the policy sent (its token ids; the pixels from
    transformers' own image processor), decoded: what a correct policy returns."""
    from transformers import Qwen2VLImageProcessorPil

    ids = torch.tensor([result.prompt_token_ids])
    image, video = hf.config.image_token_id, hf.config.video_token_id
    pixels = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=64 * 28 * 28)(
        images=[screenshot], return_tensors="pt"
    )
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == image).long() + 2 * (ids == video).long(),
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return llm.tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_example_loop_with_an_llm_policy(family, checkpoints, hf_models, monkeypatch):
    from qwenvl import LLM

    ex = load_example()
    llm = LLM(checkpoints(family), dtype="float32", max_pixels=64 * 28 * 28)
    chats = []  # (messages, result) of every chat the policy makes
    chat = llm.chat

    def recorded_chat(messages, params):
        (result,) = chat(messages, params)
        chats.append((messages, result))
        return [result]

    monkeypatch.setattr(llm, "chat", recorded_chat)
    # By hand: 640x360 under max_pixels 64*28*28 = 50176 is resized by 224/480 to 298.7x168,
    # floored to multiples of 28: 280x168, i.e. 10x6 = 60 image tokens. "Clear" spans
    # (339, 198)-(448, 234), centre (393, 216): (393*280/640, 216*168/360) = (172, 101) in
    # Qwen2.5-VL's resized pixels, (614, 600) in Qwen2-VL's 0..1000.
    written, resolution = (
        ([172, 101], "280x168") if family == "qwen2_5_vl" else ([614, 600], "1000x1000")
    )
    app = ex.SimulatedScreen(640, 360)
    with monkeypatch.context() as m:
        fix_output_text(m, call("computer_use", action="left_click", coordinate=written))
        steps = ex.run_agent(
            app,
            ex.LLMPolicy(llm, max_tokens=2),
            "t",
            family,
            vision=llm.processor.vision,
            max_steps=1,
        )
    assert steps[0].error is None and app.element_at(*app.clicks[0]) == "Clear"
    assert abs(app.clicks[0][0] - 393) <= 1 and abs(app.clicks[0][1] - 216) <= 1
    ((messages, result),) = chats
    g = result.images[0]
    assert (g.original_width, g.original_height) == (640, 360)
    assert (g.resized_width, g.resized_height, g.num_tokens) == (280, 168, 60)
    assert result.prompt_token_ids.count(llm.config.image_token_id) == 60
    assert f"The screen's resolution is {resolution}." in messages[0]["content"]
    # The real tiny model writes noise: the policy returns exactly transformers' greedy reply,
    # every step is an error fed back into the next prompt, and the loop still ends.
    chats.clear()
    app = ex.SimulatedScreen(640, 360)
    steps = ex.run_agent(
        app, ex.LLMPolicy(llm, max_tokens=4), "t", family, vision=llm.processor.vision, max_steps=2
    )
    assert len(steps) == len(chats) == 2
    for step, (messages, result) in zip(steps, chats):
        screenshot = messages[1]["content"][1]["image"]
        assert step.text == hf_greedy_text(hf_models(family), llm, result, screenshot, 4)
        assert step.error is not None and step.actions == [] and app.clicks == []
    assert "Step1: invalid action (" in chats[1][0][1]["content"][0]["text"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_block_world_episode_with_the_demo_model(seed):
    """The bundled demo model as the policy of ``--blocks``: the scene (not the model) says which
    block each click hit, and the episode must hit every block in order of their numbers, each
    click confirmed in the demo's words."""
    import random

    from qwenvl import LLM
    from qwenvl.demo.scenes import random_scene
    from qwenvl.demo.tasks import click_confirmation

    ex = load_example()
    world = ex.BlockScreen(random_scene(random.Random(seed), 6))
    lines = ex.run_blocks(LLM(), world)
    want = sorted(b.number for b in world.scene.blocks)
    assert world.hits == want, lines
    for n, line in zip(want, lines[1:]):
        assert line.endswith(f"the model: {click_confirmation(n)!r}"), line
