"""Tensor parallelism on the CPU (gloo): every size answers as size 1 does.

The truth is the same checkpoint at tensor_parallel_size=1, whose parity with transformers the
model tests establish: greedy tokens identical and log-probs within 1e-4, for text, one image,
two images, a video and a batch of them mixed, streamed and not, with both caches on, with KV
heads fewer than, equal to and more than the ranks. Seeded sampling draws the same tokens at any
size (rank 0 samples). A rank reads only its slice of each tensor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine import convs, image, text, user

import tiny
from processes import alive, wait_gone
from qwenvl import LLM, SamplingParams
from qwenvl.engine.config import EngineConfig
from qwenvl.errors import ConfigError, EngineDeadError
from qwenvl.weights import iter_tensor_specs, read_slice

GREEDY = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, logprobs=3)
LOGPROB_TOL = 1e-4

# (attention heads, KV heads, ranks): KV heads fewer than, equal to and more than the ranks
SHAPES = {
    "kv1-tp2": (4, 1, 2),
    "kv2-tp2": (4, 2, 2),
    "kv4-tp2": (4, 4, 2),
    "kv2-tp4": (4, 2, 4),
    "kv4-tp4": (4, 4, 4),
    "kv8-tp4": (8, 8, 4),
}


def text_shape(heads: int, kv: int) -> tuple[tuple[str, object], ...]:
    head_dim = tiny.TEXT["hidden_size"] // heads  # mrope_section sums to head_dim / 2
    mrope = [2, 3, 3] if head_dim == 16 else [1, 1, 2]
    return (
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv),
        ("mrope_section", tuple(mrope)),
    )


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_ckpt")
    built: dict[tuple[str, int, int], Path] = {}

    def get(family: str, heads: int, kv: int) -> Path:
        key = (family, heads, kv)
        if key not in built:
            out = root / f"{family}-h{heads}-kv{kv}"
            built[key] = tiny.build_checkpoint(out, family, text=text_shape(heads, kv))
        return built[key]

    return get


def assert_same(got, want) -> None:
    """Greedy tokens identical, log-probs of every listed token within LOGPROB_TOL."""
    assert got.token_ids == want.token_ids
    worst = max(abs(g[t] - w[t]) for g, w in zip(got.logprobs, want.logprobs) for t in w)
    assert worst <= LOGPROB_TOL, worst


def replies(llm: LLM, conversations, params=GREEDY):
    return [r.outputs[0] for r in llm.chat(conversations, params)]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_size_answers_as_size_one(family, shape, shaped):
    heads, kv, size = SHAPES[shape]
    folder = shaped(family, heads, kv)
    # text, one image, two images, a video; the first image again after other text (its
    # features come from the encoder cache, not the prefix cache)
    again = user(text("Look at this:"), {"type": "image", "image": image(4)}, text("Describe."))
    conversations = [*convs(), again]
    want = replies(LLM(folder, dtype="float32"), conversations)
    with LLM(folder, dtype="float32", tensor_parallel_size=size) as llm:
        assert llm.model.config.text.num_key_value_heads == max(1, kv // size)
        assert llm.engine.kv.k[0].shape[1] == max(1, kv // size)  # the rank's own KV heads
        for k, conv in enumerate(conversations):  # alone
            assert_same(replies(llm, [conv])[0], want[k])
        for got, w in zip(replies(llm, conversations), want):  # batched, caches warm
            assert_same(got, w)
        streamed = [t for e in llm.stream_chat(conversations[2], GREEDY) for t in e.token_ids]
        assert streamed == want[2].token_ids
        stats = llm.engine.stats
        assert stats["prefix_cache_hits"] > 0 and stats["encoder_cache_hits"] > 0


def test_chunked_prefill_preemption_and_seeded_sampling(shaped):
    folder = shaped("qwen2_vl", 4, 1)
    # 7-token chunks, and 60 blocks of 2 that the batch's 16 new tokens each outgrow (2
    # preemptions at size 1)
    cfg = EngineConfig(max_num_batched_tokens=7, num_kv_blocks=60, block_size=2)
    longer = SamplingParams(temperature=0, max_tokens=16, min_tokens=16, logprobs=3)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, n=2, logprobs=1)
    conversations = convs()
    threads = torch.get_num_threads()
    one = LLM(folder, dtype="float32", engine_config=cfg)
    want, want_seeded = replies(one, conversations, longer), one.chat(conversations[1], seeded)[0]
    assert one.engine.stats["preemptions"] > 0
    with LLM(folder, dtype="float32", engine_config=cfg, tensor_parallel_size=2) as llm:
        for got, w in zip(replies(llm, conversations, longer), want):
            assert_same(got, w)
        assert llm.engine.stats["preemptions"] > 0
        got_seeded = llm.chat(conversations[1], seeded)[0]
        for g, w in zip(got_seeded.outputs, want_seeded.outputs):
            assert_same(g, w)
        with pytest.raises(ConfigError, match="one tensor-parallel LLM per process"):
            LLM(folder, dtype="float32", tensor_parallel_size=2)
    with pytest.raises(EngineDeadError, match="shut down"):
        replies(llm, conversations[:1])
    assert torch.get_num_threads() == threads  # rank 0 gives back the cores it shared


def sixteen_bit(src: Path, out: Path) -> Path:
    """A bf16 copy of a tiny checkpoint (what released checkpoints and ``quantize`` start from)."""
    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("fmt", ["bf16", "awq", "gptq"])
def test_compact_and_quantized_formats_split(fmt, shaped, tmp_path):
    """Packed bf16 (fused q/k/v and gate/up read as row slices) and AWQ / GPTQ checkpoints
    (integers cut where they are packed, inputs in whole groups) at size 2 as at size 1."""
    from qwenvl.cli.main import main

    folder = sixteen_bit(shaped("qwen2_vl", 4, 2), tmp_path / "bf16")
    kwargs: dict = {"pack_weights": True, "prefill_dtype": "float32"}  # as split ranks run it
    if fmt != "bf16":
        out = tmp_path / fmt
        args = ["quantize", str(folder), "--method", "int4", "--layout", fmt]
        assert main([*args, "--group-size", "32", "--output", str(out)]) == 0
        folder, kwargs = out, {}
    conversations = convs()[:2]
    want = replies(LLM(folder, **kwargs), conversations)
    with LLM(folder, tensor_parallel_size=2, **kwargs) as llm:
        assert llm.weight_format == want_format(fmt)
        for got, w in zip(replies(llm, conversations), want):
            assert_same(got, w)


def want_format(fmt: str) -> str:
    return {"bf16": "bf16", "awq": "awq:w4g32", "gptq": "gptq:w4g32"}[fmt]


def test_a_rank_reads_only_its_slice(checkpoints, tmp_path):
    """read_slice against safetensors' own reading of the whole tensor, then sliced."""
    folder = checkpoints("qwen2_vl")
    whole = load_file(folder / "model.safetensors")
    for name, path, spec, base in iter_tensor_specs([folder / "model.safetensors"]):
        t = whole[name]
        for dim in range(t.dim()):
            n = t.shape[dim]
            start, width = n // 4, max(1, n // 2)
            out = torch.empty(*t.shape[:dim], width, *t.shape[dim + 1 :], dtype=torch.float32)
            read_slice(path, spec, base, out, dim, start)
            assert torch.equal(out, t.narrow(dim, start, width).float()), (name, dim)


def test_sizes_that_cannot_split_are_refused(shaped):
    with pytest.raises(ConfigError, match="must divide the 4 attention heads"):
        LLM(shaped("qwen2_vl", 4, 2), dtype="float32", tensor_parallel_size=3)


# --- processes ------------------------------------------------------------------------------
def test_a_killed_worker_fails_requests_clearly_and_shutdown_ends_the_rest(shaped):
    llm = LLM(shaped("qwen2_vl", 4, 4), dtype="float32", tensor_parallel_size=4)
    pids = [p.pid for p in llm.workers.procs]
    conv = user(text("hello there, how are you today?"))
    assert replies(llm, [conv])[0].token_ids
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"rank 2 killed by SIGKILL"):
        for _ in range(50):  # the watcher may see the death before or during a step
            replies(llm, [conv])
    assert time.monotonic() - start < 10
    with pytest.raises(EngineDeadError):  # and every later request
        replies(llm, [user({"type": "image", "image": image(1)}, text("Describe."))])
    llm.shutdown()
    assert wait_gone(pids) == []


RANK0 = """
import sys, time
from qwenvl import LLM
llm = LLM(sys.argv[1], dtype="float32", tensor_parallel_size=2)
print(" ".join(str(p.pid) for p in llm.workers.procs), flush=True)
time.sleep(600)
"""


def test_workers_die_with_a_crashed_rank_zero(shaped, tmp_path):
    """SIGKILL of the process that started the workers (no cleanup runs) still ends them."""
    script = tmp_path / "rank0.py"
    script.write_text(RANK0)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(shaped("qwen2_vl", 4, 2))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and all(alive(p) for p in pids)
        proc.kill()
        proc.wait()
        assert wait_gone(pids, 10) == []
    finally:
        proc.kill()
