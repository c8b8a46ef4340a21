"""A third model family plugs in through the registry alone (``toy_plugin/toy_family.py``):
registered in-process it runs through ``LLM``; installed as a package with an entry point it runs
through ``qwenvl serve``. No file of the engine, processing or server knows it.

Independent truths: positions computed by hand from the toy's rule, and a greedy loop over full
sequences with ``model(...)`` (no engine, no KV cache, no backend) at those positions.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl import LLM, SamplingParams
from qwenvl.models import family_of, get_family

TOY_DIR = Path(__file__).parent / "toy_plugin"
GAP = 5
MAX_TOKENS = 6


def _toy_module():
    sys.path.insert(0, str(TOY_DIR))
    try:
        import toy_family
    finally:
        sys.path.remove(str(TOY_DIR))
    return toy_family


@pytest.fixture(scope="module")
def toy_checkpoint(checkpoints, tmp_path_factory) -> Path:
    """The tiny Qwen2-VL checkpoint relabelled ``toy_vl``, with the toy's own config field."""
    out = tmp_path_factory.mktemp("toy") / "toy-vl"
    shutil.copytree(checkpoints("qwen2_vl"), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = cfg["vision_config"]["model_type"] = "toy_vl"
    cfg["item_gap"] = GAP
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def toy_llm(toy_checkpoint) -> LLM:
    _toy_module().register_toy()
    return LLM(toy_checkpoint, dtype="float32")


def image_url(seed: int = 3) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages() -> list[dict]:
    content = [
        {"type": "image_url", "image_url": {"url": image_url()}},
        {"type": "text", "text": "What is in the picture?"},
    ]
    return [{"role": "user", "content": content}]


def hand_positions(token_ids: list[int], image_token_id: int) -> tuple[torch.Tensor, int]:
    """The toy rule by hand: position = index, plus GAP after the (one) image run."""
    ids = torch.tensor(token_ids)
    end = int((ids == image_token_id).nonzero().max()) + 1
    pos = torch.arange(len(ids)) + GAP * (torch.arange(len(ids)) >= end)
    return pos.expand(3, -1), GAP


def test_the_registry_finds_the_toy_family(toy_llm) -> None:
    family = family_of(toy_llm.config)
    assert family is get_family("toy_vl") and family.display_name == "Toy-VL"
    assert type(toy_llm.config).__name__ == "ToyConfig" and toy_llm.config.item_gap == GAP
    assert toy_llm.processor.family is family


def test_prompt_positions_follow_the_toy_rule(toy_llm) -> None:
    prompt = toy_llm.processor.prepare_chat(messages())
    expected, delta = hand_positions(prompt.token_ids, toy_llm.config.image_token_id)
    assert torch.equal(prompt.positions, expected) and prompt.rope_delta == delta
    # a Qwen2-VL rule would place the image on a 2-D grid: the toy's positions are its own
    qwen2 = get_family("qwen2_vl").positions(
        toy_llm.config, prompt.token_ids, [im.grid_thw for im in prompt.images], [], []
    )
    assert not torch.equal(qwen2[0], expected)


def _reference_greedy(llm: LLM, n: int) -> list[int]:
    """Greedy tokens from full-sequence forwards at hand-computed positions."""
    prompt = llm.processor.prepare_chat(messages())
    ids = list(prompt.token_ids)
    pixels = torch.cat([im.pixel_values for im in prompt.images])
    grids = [im.grid_thw for im in prompt.images]
    out = []
    with torch.no_grad():
        for _ in range(n):
            pos, _ = hand_positions(ids, llm.config.image_token_id)
            logits = llm.model(
                torch.tensor([ids]), pos[:, None], pixel_values=pixels, image_grid_thw=grids
            )
            out.append(int(logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


def test_llm_chat_runs_the_toy_family(toy_llm) -> None:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = toy_llm.chat(messages(), params)[0].outputs[0].token_ids
    assert got == _reference_greedy(toy_llm, MAX_TOKENS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_qwenvl_serve_loads_the_toy_family_from_an_installed_plugin(
    toy_llm, toy_checkpoint, tmp_path
) -> None:
    """A package on the path with a ``qwenvl.model_families`` entry point is all it takes."""
    dist = tmp_path / "toy_vl-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-vl\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[qwenvl.model_families]\ntoy_vl = toy_family:ToyVL\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TOY_DIR)])}
    port = _free_port()
    cmd = [sys.executable, "-m", "qwenvl", "serve", "--model", str(toy_checkpoint)]
    cmd += ["--port", str(port), "--dtype", "float32", "--served-model-name", "toy"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "qwenvl serve did not start"
                time.sleep(0.3)
        body = {
            "model": "toy",
            "messages": messages(),
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
        }
        reply = _post(base + "/v1/chat/completions", body)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    expected = toy_llm.tokenizer.decode(_reference_greedy(toy_llm, MAX_TOKENS))
    assert reply["choices"][0]["message"]["content"] == expected
    assert reply["usage"]["completion_tokens"] == MAX_TOKENS
