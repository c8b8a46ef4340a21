"""Every error class of the server: OpenAI error bodies, the right status, and a server that
keeps serving afterwards."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import openai
import pytest
from server_helpers import API_KEY, MODEL, bomb_png, data_uri, jpeg_bytes, png_bytes

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _post(running: Any, body: Any, **kw: Any) -> httpx.Response:
    headers = kw.pop("headers", AUTH)
    return httpx.post(
        f"{running.base_url}/chat/completions",
        headers=headers,
        timeout=30,
        **kw,
        **({"json": body} if not isinstance(body, (bytes, str)) else {"content": body}),
    )


def _image(url: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is it?"},
                ],
            }
        ],
    }


def _error(r: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    return err


def _still_serving(running: Any) -> None:
    ok = _post(
        running, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{running.root}/health").status_code == 200


def test_auth_and_model(server: Any) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    _error(_post(server, body, headers={}), 401, "API key")
    _error(_post(server, body, headers={"Authorization": "Bearer test-kez"}), 401)
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    assert "gpt-4o" in str(e.value)
    err = _error(_post(server, {**body, "model": "nope"}), 404, "nope")
    assert err["code"] == "model_not_found" and err["param"] == "model"
    _error(httpx.get(f"{server.base_url}/nothing-here"), 404)
    _still_serving(server)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", ["not valid JSON"]),
        (b"[1, 2]", ["JSON object"]),
        ({"model": MODEL}, ["messages"]),
        ({"model": MODEL, "messages": []}, ["messages"]),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, ["role"]),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:,", "foo": 1}}
                        ],
                    }
                ],
            },
            ["messages.0.content.0", "foo", "Extra inputs"],
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
                ],
            },
            ["messages.0.content.0"],
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "x", "max_pixels": -5}}
                        ],
                    }
                ],
            },
            ["max_pixels"],
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "video_url", "video_url": {"url": "x", "fps": 2, "frames": 3}}
                        ],
                    }
                ],
            },
            ["frames"],
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, ["top_p"]),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}, ["n"]),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            ["logprobs"],
        ),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "tool_choice": {"type": "function", "function": {"name": "f"}},
            },
            ["tool_choice"],
        ),
        (
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema"},
            },
            ["response_format"],
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "bogus": 1}, ["bogus"]),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "assistant",
                        "content": "x",
                        "tool_calls": [
                            {
                                "id": "1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{bad"},
                            }
                        ],
                    }
                ],
            },
            ["arguments"],
        ),
    ],
)
def test_malformed_requests_are_400(server: Any, body: Any, words: list[str]) -> None:
    _error(_post(server, body), 400, *words)


def test_bad_media_is_400_or_413(server: Any) -> None:
    truncated = jpeg_bytes((300, 200))
    truncated = truncated[: len(truncated) // 2]
    cases = [
        (data_uri(bomb_png()), 413, ["pixels"]),
        (data_uri(truncated, "image/jpeg"), 400, ["messages[0].content[0]", "truncated"]),
        ("data:image/png;base64,!!!not-base64!!!", 400, ["messages[0].content[0]", "base64"]),
        ("data:image/png;base64,", 400, ["messages[0].content[0]"]),
        (data_uri(b"hello, not an image"), 400, ["not an image"]),
        ("file:///etc/passwd", 400, ["outside the allowed local media path"]),
        ("red.png", 400, ["unsupported media URL"]),
        ("ftp://example.com/x.png", 400, ["unsupported media URL"]),
    ]
    for url, status, words in cases:
        _error(_post(server, _image(url)), status, *words)
    video = _image("data:video/mp4;base64,")
    video["messages"][0]["content"][0] = {
        "type": "video_url",
        "video_url": {"url": "data:video/mp4;base64,"},
    }
    _error(_post(server, video), 400, "messages[0].content[0]")
    _still_serving(server)


def test_unsafe_urls_are_refused(server: Any, media_server: Any) -> None:
    for url in (
        "http://10.1.2.3/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/x.png",
        f"http://localhost:{media_server.port}/red.png",  # loopback under a name not trusted
    ):
        _error(_post(server, _image(url)), 400, "refusing to fetch")
    # each redirect hop is checked too
    for path in ("to-localhost", "to-metadata"):
        _error(_post(server, _image(media_server.url(path))), 400, "refusing to fetch")
    hits = media_server.hits.get("/red.png", 0)
    assert _post(server, _image(media_server.url("to-red"))).status_code == 200
    assert media_server.hits["/red.png"] == hits + 1
    _error(_post(server, _image(media_server.url("missing.png"))), 400, "HTTP 404")
    _still_serving(server)


def test_context_limits_are_checked_up_front(server: Any) -> None:
    long = "Describe this image. What is in the picture? Count the boxes. " * 400
    err = _error(
        _post(server, {"model": MODEL, "messages": [{"role": "user", "content": long}]}),
        400,
        "tokens",
        "context",
    )
    assert err["code"] == "context_length_exceeded"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}
    err = _error(_post(server, body), 400, "max_tokens=10000", "4096")
    assert err["param"] == "max_tokens"
    _still_serving(server)


def test_size_limits_are_413(tight: Any, media_server: Any) -> None:
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 200_000}]}
    assert _error(_post(tight, big, headers={}), 413, "body")["code"] == "request_too_large"
    _error(_post(tight, _image(media_server.url("big.png")), headers={}), 413, "20000")
    _error(_post(tight, _image(data_uri(png_bytes(size=(400, 400)))), headers={}), 413)
    _still_serving_tight(tight)


def _still_serving_tight(tight: Any) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    assert _post(tight, body, headers={}).status_code == 200


def test_queue_full_is_429_with_retry_after(tight: Any, media_server: Any) -> None:
    media_server.release.clear()
    slow: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: slow.update(r=_post(tight, _image(media_server.url("slow.png")), headers={}))
    )
    t.start()
    try:
        deadline = time.monotonic() + 10
        while tight.state.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        r = _post(tight, body, headers={})
        err = _error(r, 429)
        assert r.headers["Retry-After"] == "1" and err["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            tight.client(api_key="none").chat.completions.create(**body)
    finally:
        media_server.release.set()
        t.join(20)
    assert slow["r"].status_code == 200
    _still_serving_tight(tight)


def test_streamed_request_errors_before_the_stream(server: Any) -> None:
    body = {**_image("http://10.0.0.1/x.png"), "stream": True}
    _error(_post(server, body), 400, "refusing to fetch")
    _still_serving(server)
