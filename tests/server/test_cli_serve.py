"""``qwenvl serve``: arguments -> ServerSettings + a safely configured LLM -> server.serve."""

from __future__ import annotations

from typing import Any

import pytest

import qwenvl.server
from qwenvl.cli.main import main


def test_serve_arguments(checkpoints: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_serve(llm: Any, settings: Any, host: str, port: int) -> None:
        seen.update(llm=llm, settings=settings, host=host, port=port)

    monkeypatch.setattr(qwenvl.server, "serve", fake_serve)
    folder = str(checkpoints("qwen2_vl"))
    argv = ["serve", "--model", folder, "--port", "8123", "--api-key", "k"]
    argv += ["--served-model-name", "m", "--allowed-local-media-path", str(tmp_path)]
    argv += ["--allowed-media-domains", "media.example", "--max-model-len", "512"]
    assert main(argv) == 0
    s = seen["settings"]
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert (s.api_key, s.served_model_name, s.allowed_media_domains) == (
        "k",
        "m",
        ("media.example",),
    )
    policy = seen["llm"].processor.media_policy
    assert not policy.allow_private_networks and policy.local_media_root == str(tmp_path)
    assert seen["llm"].engine.max_model_len == 512
    # defaults: the model argument names the model, no local files at all
    assert main(["serve", "--model", folder]) == 0
    assert seen["settings"].served_model_name == folder
    assert not seen["llm"].processor.media_policy.allow_local_files
