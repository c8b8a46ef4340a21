"""The one SSE writer behind chat and completions streams: the same framing, usage, error events,
``[DONE]`` and HTTP statuses for both endpoints; the latency metric counting every endpoint."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from server_helpers import API_KEY, MODEL, data_uri, fix_server_text, png_bytes

from qwenvl.outputs import StreamEvent

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ENDPOINTS = ("chat/completions", "completions")


def _body(endpoint: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    body.update(extra)
    if endpoint == "completions":
        body["prompt"] = "The red box"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    return body


def _sse(running: Any, endpoint: str, body: dict[str, Any]) -> tuple[httpx.Response, list[Any]]:
    """The response and its events' data: JSON objects, and the final ``"[DONE]"`` as a str."""
    r = httpx.post(f"{running.base_url}/{endpoint}", json=body, headers=AUTH, timeout=60)
    if not r.headers["content-type"].startswith("text/event-stream"):
        return r, []
    assert r.text.endswith("\n\n")
    events = []
    for block in r.text[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return r, events


def _fail_engine(
    monkeypatch: pytest.MonkeyPatch, running: Any, error: Exception, after: int
) -> None:
    """Make the engine stream ``after`` events of one token each, then raise ``error``."""
    engine = running.state.engine

    async def failing(prompt: Any, params: Any, request_id: str) -> AsyncIterator[StreamEvent]:
        for _ in range(after):
            yield StreamEvent(request_id, 0, "ab", [running.llm.tokenizer.encode("ab")[0]])
        raise error

    monkeypatch.setattr(engine, "generate", failing)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_stream_framing_and_final_usage(server: Any, endpoint: str) -> None:
    full = httpx.post(f"{server.base_url}/{endpoint}", json=_body(endpoint), headers=AUTH).json()
    body = _body(endpoint, stream=True, stream_options={"include_usage": True})
    r, events = _sse(server, endpoint, body)
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-cache"
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert chunks and all(c["usage"] is None for c in chunks)
    assert last["choices"] == [] and last["usage"] == full["usage"]
    ids = {c["id"] for c in events[:-1]}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-" if "chat" in endpoint else "cmpl-")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_continuous_usage_counts_up(server: Any, endpoint: str) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    _, events = _sse(server, endpoint, _body(endpoint, stream=True, stream_options=options))
    counts = [e["usage"]["completion_tokens"] for e in events[:-1]]
    assert counts == sorted(counts) and counts[-1] == 4
    assert {e["usage"]["prompt_tokens"] for e in events[:-1]} == {
        events[-2]["usage"]["prompt_tokens"]
    }


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_error_mid_stream_is_an_error_event(
    server: Any, endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_engine(monkeypatch, server, ValueError("boom"), after=1)
    r, events = _sse(server, endpoint, _body(endpoint, stream=True))
    assert r.status_code == 200  # the status went out with the first event
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["message"] == "generation failed: boom" and err["type"] == "server_error"
    texts = [c.get("text") or c.get("delta", {}).get("content") for c in events[-3]["choices"]]
    assert texts == ["ab"]
    assert server.state.waiting == 0


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_error_before_the_first_event_is_an_http_error(
    server: Any, endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_engine(monkeypatch, server, RuntimeError("the engine is shut down"), after=0)
    for stream in (True, False):
        r, events = _sse(server, endpoint, _body(endpoint, stream=stream))
        assert r.status_code == 503 and not events
        assert r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "unavailable"
    assert server.state.waiting == 0


def _latency_count(running: Any) -> int:
    text = httpx.get(f"{running.root}/metrics", headers=AUTH).text
    return int(re.search(r"^qwenvl_request_latency_seconds_count (\d+)$", text, re.M)[1])


def test_latency_metric_counts_every_endpoint(server: Any) -> None:
    before = _latency_count(server)
    for endpoint in ENDPOINTS:
        for stream in (False, True):
            r, _ = _sse(server, endpoint, _body(endpoint, stream=stream))
            assert r.status_code == 200
    assert _latency_count(server) == before + 4


def test_streamed_grounding_sees_text_the_tool_parser_held(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the tool parser holds a call's text back until the call is complete: the grounding at the
    # end must still see all of it, as the non-streamed response does
    box = "<|object_ref_start|>it<|object_ref_end|><|box_start|>(100,200),(500,600)<|box_end|>"
    text = f'<tool_call>\n{{"name": "find", "arguments": {{"q": "{box}"}}}}\n</tool_call>'
    fix_server_text(monkeypatch, server, text)
    tool = {"type": "function", "function": {"name": "find", "parameters": {"type": "object"}}}
    content = [
        {"type": "image_url", "image_url": {"url": data_uri(png_bytes(size=(200, 100)))}},
        {"type": "text", "text": "Find it."},
    ]
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": content}],
        "tools": [tool],
        "qwenvl": {"grounding": True},
    }
    full = httpx.post(f"{server.base_url}/chat/completions", json=body, headers=AUTH).json()
    (g,) = full["qwenvl"]["grounding"]
    assert len(g["objects"]) == 1
    _, events = _sse(server, "chat/completions", {**body, "stream": True})
    assert events[-2]["qwenvl"]["grounding"] == [g]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
