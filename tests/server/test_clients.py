"""What real clients send: fields that say nothing to the model are accepted and ignored
(qwen-agent's ``id`` on tool results, response fields a client echoes back), while unknown vision
options and sampling parameters stay refused; OpenAI's ``detail: "low"`` only ever lowers an
image's budget."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from server_helpers import API_KEY, MODEL, data_uri, png_bytes


def post(base_url: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.post(f"{base_url}/chat/completions", json=body, headers=headers, timeout=60)


def test_fields_clients_send_are_accepted_and_ignored(server):
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    echoed = {  # an assistant message appended as the client received it
        "role": "assistant",
        "content": None,
        "tool_calls": [call],
        "refusal": None,
        "annotations": [],
        "audio": None,
        "function_call": None,
        "reasoning_content": "",
    }
    tool = {"role": "tool", "id": "msg_7", "tool_call_id": "call_1", "name": "f", "content": "ok"}
    body = {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi", "id": "msg_1"}, echoed, tool,
        {"role": "assistant", "content": "done", "refusal": "none needed"},
        {"role": "user", "content": "thanks"},
    ]}  # fmt: skip
    plain = {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "name": "f", "content": "ok"},
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": "thanks"},
    ]}  # fmt: skip
    got, want = post(server.base_url, body), post(server.base_url, plain)
    assert got.status_code == 200, got.text
    assert got.json()["usage"]["prompt_tokens"] == want.json()["usage"]["prompt_tokens"]
    # still refused: options that would change the answer if ignored
    bad_option = {"type": "image_url", "image_url": {"url": data_uri(png_bytes()), "zoom": 2}}
    r = post(
        server.base_url, {"model": MODEL, "messages": [{"role": "user", "content": [bad_option]}]}
    )
    assert r.status_code == 400 and "zoom" in r.text
    r = post(
        server.base_url,
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "mirostat": 2},
    )
    assert r.status_code == 400 and "mirostat" in r.text


@pytest.mark.parametrize("size", [(56, 56), (140, 140), (700, 500)])
def test_detail_low_never_raises_the_tokens_of_an_image(demo_server, size):
    def tokens(detail: str | None) -> int:
        url: dict[str, Any] = {"url": data_uri(png_bytes(size=size))}
        if detail:
            url["detail"] = detail
        content = [{"type": "image_url", "image_url": url}, {"type": "text", "text": "Colours?"}]
        r = post(
            demo_server.base_url,
            {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": content}]},
        )
        assert r.status_code == 200, r.text
        return r.json()["qwenvl"]["images"][0]["tokens"]

    assert tokens("low") <= tokens(None) == tokens("auto") == tokens("high")


def test_a_video_reports_its_own_size(server):
    """Frames come out of the decoder already resized; the reported original is the file's."""
    from server_helpers import mp4_bytes

    url = {"url": data_uri(mp4_bytes(n=8, size=112), "video/mp4"), "max_pixels": 56 * 56}
    content = [{"type": "video_url", "video_url": url}, {"type": "text", "text": "What?"}]
    r = post(
        server.base_url,
        {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": content}]},
    )
    assert r.status_code == 200, r.text
    video = r.json()["qwenvl"]["videos"][0]
    assert (video["original_width"], video["original_height"]) == (112, 112)
    assert video["resized_width"] * video["resized_height"] <= 56 * 56


def test_the_first_request_after_ready_is_as_fast_as_the_second(checkpoints, tmp_path):
    """``qwenvl serve`` with a cold kernel cache (a fresh HOME): the build and first-use costs
    are paid before /health answers, not by the first request."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from processes import free_port, wait_ready

    port = free_port()
    cmd = [sys.executable, "-m", "qwenvl", "serve", "--model", str(checkpoints("qwen2_vl"))]
    cmd += ["--dtype", "float32", "--port", str(port), "--api-key", API_KEY]
    env = dict(os.environ, HOME=str(tmp_path))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        wait_ready(port, [proc], timeout=600)
        image = {"type": "image_url", "image_url": {"url": data_uri(png_bytes(size=(90, 60)))}}
        content = [image, {"type": "text", "text": "Describe."}]
        messages = [{"role": "user", "content": content}]
        body = {"model": str(checkpoints("qwen2_vl")), "max_tokens": 8, "messages": messages}
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            assert post(f"http://127.0.0.1:{port}/v1", body).status_code == 200
            times.append(time.perf_counter() - t0)
        assert times[0] <= 2 * max(times[1:]), times
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)


def _png(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_a_video_as_a_list_of_frames(demo_server):
    """qwen-agent's ``{"type": "video", "video": [frame, ...]}``: every frame is used (the prompt
    has the tokens of all of them) and the demo model finds the second a block appears, as the
    scene generator drew it. Each frame's URL is checked like any other."""
    from qwenvl.demo.evaluate import EVAL_SEED
    from qwenvl.demo.tasks import VIDEO_OPTIONS, sample_at

    right = 0
    for i in range(4):
        s = sample_at(EVAL_SEED, i, ["when"])
        frames = [data_uri(_png(f)) for f in s.video]
        part = {"type": "video", "video": frames, **VIDEO_OPTIONS}
        content = [part, {"type": "text", "text": s.question}]
        body = {"model": MODEL, "max_tokens": 8, "temperature": 0}
        r = post(demo_server.base_url, {**body, "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, r.text
        video = r.json()["qwenvl"]["videos"][0]
        # 2 frames per temporal patch, (112 / 28)^2 = 16 merged tokens per patch
        assert video["tokens"] == (len(s.video) + 1) // 2 * 16
        right += r.json()["choices"][0]["message"]["content"].strip() == str(s.info["second"])
    assert right >= 3
    content = [{"type": "video", "video": [frames[0], "ftp://example.com/f.png"]}]
    r = post(
        demo_server.base_url, {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    )
    assert r.status_code == 400 and "messages[0].content[0].video[1]" in r.text, r.text
    content = [{"type": "video", "video": []}]
    r = post(
        demo_server.base_url, {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    )
    assert r.status_code == 400, r.text
