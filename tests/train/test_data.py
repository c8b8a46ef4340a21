from __future__ import annotations

import json

import pytest

from conftest import sft_lines, write_images, write_jsonl
from qwenvl.checkpoint import load_config
from qwenvl.processing.prompt import Processor
from qwenvl.train.data import DataError, encode_record, read_jsonl
from qwenvl.train.dataset import load_sft


def _processor(checkpoints):
    path = checkpoints("qwen2_vl")
    return Processor.from_pretrained(path, load_config(path))


def test_targets_are_assistant_turns_only(checkpoints, sft_file):
    proc = _processor(checkpoints)
    samples = load_sft(sft_file, proc)
    tok = proc.tokenizer
    for s, line in zip(samples, sft_lines()):
        trained = tok.decode([t for t, f in zip(s.token_ids, s.targets.tolist()) if f])
        replies = [m["content"] for m in line["messages"] if m["role"] == "assistant"]
        assert trained == "".join(r + "<|im_end|>" for r in replies)
        assert s.positions.shape == (3, len(s))
    assert samples[0].images and samples[0].images[0].grid_thw == (1, 4, 4)


def test_whole_file_is_checked_with_line_numbers(tmp_path):
    write_images(tmp_path / "images")
    lines = sft_lines()
    lines[1] = {"messages": [{"role": "user", "content": "hi"}]}
    lines[2]["messages"][0]["content"][0]["image"] = "images/missing.png"
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert "bad.jsonl:2: no assistant message" in msg
    assert "bad.jsonl:3:" in msg and "missing.png" in msg
    assert "bad.jsonl:5: not valid JSON" in msg


def test_overlong_rejected_or_split_at_turns(checkpoints, tmp_path):
    proc = _processor(checkpoints)
    record = sft_lines(with_images=False)[1]
    full = encode_record(proc, record, 1)[0]
    with pytest.raises(DataError, match="budget"):
        encode_record(proc, record, 7, max_len=len(full) - 1)
    pieces = encode_record(proc, record, 7, max_len=len(full) - 1, overlong="split")
    assert len(pieces) == 2 and all(len(p) < len(full) for p in pieces)
    assert sum(p.num_targets for p in pieces) == full.num_targets
    json.dumps(record)  # unchanged, still serialisable
