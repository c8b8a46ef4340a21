"""The demo model calling the click tool through the clients people use: qwen-agent's
``FnCallAgent`` in native tool mode (``use_raw_api``: the server's own tool calls) and LangChain's
``ChatOpenAI.bind_tools``, each over two turns (the call, then the tool's result and the
confirmation). The truth is the scene: the click must land inside the named block."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from server_helpers import API_KEY, MODEL, data_uri

from qwenvl.demo.scenes import random_scene, render
from qwenvl.demo.tasks import click_confirmation, click_tool, demo_screen


def _scene_png(seed: int) -> tuple[Any, bytes]:
    import io

    scene = random_scene(random.Random(seed), 6)
    buf = io.BytesIO()
    render(scene).save(buf, "PNG")
    return scene, buf.getvalue()


def _inside(scene: Any, number: int, coordinate: list[int]) -> bool:
    """The model's coordinate (pixels of the image it sees) mapped back to the scene's."""
    x, y = demo_screen(scene.width, scene.height).to_screen(*coordinate)
    x1, y1, x2, y2 = scene.by_number(number).box
    return x1 <= x < x2 and y1 <= y < y2


@pytest.mark.parametrize("seed", [1, 2])
def test_qwen_agent_native_tools_click_and_confirm(demo_server, seed, tmp_path):
    from qwen_agent.agents import FnCallAgent
    from qwen_agent.tools.base import BaseTool

    scene, png = _scene_png(seed)
    number = scene.blocks[len(scene.blocks) // 2].number
    spec = click_tool()["function"]
    clicks: list[list[int]] = []

    class ComputerUse(BaseTool):
        name = spec["name"]
        description = spec["description"]
        parameters = spec["parameters"]

        def call(self, params: str | dict, **kwargs: Any) -> str:
            args = json.loads(params) if isinstance(params, str) else params
            clicks.append(args["coordinate"])
            return "done"

    picture = tmp_path / "screen.png"
    picture.write_bytes(png)
    # as the Qwen2.5-VL cookbooks configure it: the VL client class, which sends the image (a
    # local file, as a data URI) and writes "(Uploaded ![image](screen.png))" before it
    llm = {"model_type": "qwenvl_oai", "model": MODEL, "model_server": demo_server.base_url,
           "api_key": API_KEY,
           "generate_cfg": {"use_raw_api": True, "temperature": 0, "max_tokens": 96}}  # fmt: skip
    agent = FnCallAgent(function_list=[ComputerUse()], llm=llm)
    question = f"Click the box with the number {number}."
    ask = [{"role": "user", "content": [{"image": str(picture)}, {"text": question}]}]
    *_, last = agent.run(ask)
    assert len(clicks) == 1 and _inside(scene, number, clicks[0])
    assert last[-1]["role"] == "assistant"
    assert last[-1]["content"].strip() == click_confirmation(number)


def test_langchain_bind_tools_click_and_confirm(demo_server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    scene, png = _scene_png(3)
    number = scene.blocks[0].number
    chat = ChatOpenAI(model=MODEL, base_url=demo_server.base_url, api_key=API_KEY,
                      temperature=0, max_tokens=96).bind_tools([click_tool()])  # fmt: skip
    ask = HumanMessage(content=[
        {"type": "image_url", "image_url": {"url": data_uri(png)}},
        {"type": "text", "text": f"Click the box with the number {number}."}])  # fmt: skip
    first = chat.invoke([ask])
    (call,) = first.tool_calls
    assert call["name"] == "computer_use" and call["args"]["action"] == "left_click"
    assert _inside(scene, number, call["args"]["coordinate"])
    reply = chat.invoke([ask, first, ToolMessage(content="ok", tool_call_id=call["id"])])
    assert reply.content.strip() == click_confirmation(number)
