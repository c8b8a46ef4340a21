"""Tests for qwenvl.tokenizer: a tiny Qwen-style tokenizer vs transformers' Qwen2Tokenizer, and
the streaming detokenizer."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from qwenvl.errors import ConfigError
from qwenvl.tokenizer import (
    QWEN_NON_SPECIAL_TOKENS,
    QWEN_SPECIAL_TOKENS,
    IncrementalDetokenizer,
    Tokenizer,
    save_tokenizer_files,
    train_qwen_style_tokenizer,
)

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. I'll say it's fine, we've done it.",
    "def add(x, y):\n    return x + y\n\nprint(add(1, 2))\n",
    "你好，世界。今天天气很好。",
    "Numbers 12345 and 67890, spaces    and\ttabs.\n\n",
] * 8

TEXTS = [
    "Hello world",
    "<|im_start|>user\nDescribe <|vision_start|><|image_pad|><|vision_end|> please.<|im_end|>\n",
    '<|im_start|>assistant\n<tool_call>\n{"name": "f"}\n</tool_call><|im_end|><|endoftext|>',
    "中文测试：你好世界！繁體字與日本語のテキスト。",
    "emoji 😀🎉👍🏽 and flags 🇺🇸🇯🇵 and zwj 👨‍👩‍👧",
    "  leading spaces,   runs   of spaces,\n\n\nnewlines\r\n and \t tabs  ",
    "e\u0301 combining (NFC → é) and Å vs A\u030a",
    "I'LL SHOUT, you'd whisper; they're 'quoted'.",
    "3.14159 × 2 = 6.28318; 1,000,000",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|><|repo_name|>x<|file_sep|>",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer_files(train_qwen_style_tokenizer(CORPUS, 400), out, chat_template="{{ 1 }}")
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_training_is_fast() -> None:
    start = time.perf_counter()
    train_qwen_style_tokenizer(CORPUS, 500)
    assert time.perf_counter() - start < 1.0


def test_vocab_size_below_byte_alphabet_rejected() -> None:
    with pytest.raises(ValueError):
        train_qwen_style_tokenizer(CORPUS, 100)


def test_special_ids_contiguous_in_real_order(tok: Tokenizer) -> None:
    added = QWEN_SPECIAL_TOKENS + QWEN_NON_SPECIAL_TOKENS
    assert len(added) == 22
    ids = [tok.require_id(t) for t in added]
    first = ids[0]
    assert ids == list(range(first, first + len(added)))
    assert ids[-1] == tok.vocab_size - 1 == len(tok) - 1
    assert tok.special_ids == frozenset(ids[: len(QWEN_SPECIAL_TOKENS)])
    assert tok.eos_token_id == tok.require_id("<|im_end|>")
    assert tok.pad_token_id == tok.require_id("<|endoftext|>")
    assert tok.model_max_length == 32768


def test_tokenizer_json_matches_released_layout(tok_dir: Path) -> None:
    data = json.loads((tok_dir / "tokenizer.json").read_text())
    assert data["normalizer"] == {"type": "NFC"}
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["behavior"] == "Isolated" and split["invert"] is False
    assert split["pattern"]["Regex"].startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)")
    flags = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    assert byte_level == {"type": "ByteLevel", **flags}
    assert data["decoder"] == {"type": "ByteLevel", **flags}
    assert data["post_processor"] == {"type": "ByteLevel", **flags}
    assert data["model"]["type"] == "BPE" and data["model"]["byte_fallback"] is False
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["bos_token"] is None and cfg["padding_side"] == "left"
    assert cfg["chat_template"] == "{{ 1 }}"
    assert cfg["additional_special_tokens"] == list(QWEN_SPECIAL_TOKENS[1:])


def test_loads_as_qwen2_tokenizer(tok: Tokenizer, hf_tok: Any) -> None:
    assert type(hf_tok).__name__ == "Qwen2Tokenizer"
    assert len(hf_tok) == tok.vocab_size
    assert hf_tok.eos_token_id == tok.eos_token_id
    assert hf_tok.pad_token_id == tok.pad_token_id
    assert hf_tok.bos_token is None and hf_tok.padding_side == "left"
    for token_id, added in hf_tok.added_tokens_decoder.items():
        assert tok.token_to_id(added.content) == token_id
        assert added.special == (token_id in tok.special_ids)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf_tok: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(
            ids, skip_special_tokens=skip
        )


@pytest.mark.parametrize("text", TEXTS)
def test_untrusted_text_matches_split_special_tokens(
    tok: Tokenizer, hf_tok: Any, text: str
) -> None:
    """No control spans: special-token strings are plain characters, as transformers'
    ``split_special_tokens=True`` reads them; non-special added tokens (``<tool_call>``) still
    match. Texts with and without such strings take different backends inside."""
    ids, _ = tok.encode_marked(text, [])
    assert ids == hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_special_tokens_in_text_are_single_ids(tok: Tokenizer) -> None:
    ids = tok.encode("a<|im_end|>b<tool_call>")
    assert tok.require_id("<|im_end|>") in ids and tok.require_id("<tool_call>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab<tool_call>"


def test_require_id_missing_raises(tok: Tokenizer) -> None:
    assert tok.token_to_id("<|no_such_token|>") is None
    with pytest.raises(ConfigError, match="no_such_token"):
        tok.require_id("<|no_such_token|>")


def test_from_dir_errors(tmp_path: Path, tok_dir: Path) -> None:
    with pytest.raises(ConfigError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|not_here|>"}')
    with pytest.raises(ConfigError, match="not_here"):
        Tokenizer.from_dir(tmp_path)


def test_config_variants(tmp_path: Path, tok_dir: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    # Without a config: transformers' Qwen2Tokenizer defaults (eos = pad = <|endoftext|>).
    bare = Tokenizer.from_dir(tmp_path)
    assert bare.eos_token_id == bare.pad_token_id == bare.require_id("<|endoftext|>")
    extra_id = bare.vocab_size
    cfg = {
        "eos_token": {"content": "<|im_end|>", "special": True},
        "pad_token": None,
        "model_max_length": 1e30,
        "added_tokens_decoder": {
            str(extra_id): {"content": "<|extra|>", "special": True},
        },
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_id == tok.require_id("<|im_end|>")
    assert tok.pad_token_id is None and tok.model_max_length is None
    assert tok.token_to_id("<|extra|>") == extra_id and extra_id in tok.special_ids


# ---------------------------------------------------------------------------------------------
# IncrementalDetokenizer


def _stream(tok: Tokenizer, ids: list[int], skip: bool, chunk: int = 1) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    assert detok.token_ids == ids
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_deltas_concatenate_to_decode(tok: Tokenizer, text: str, skip: bool) -> None:
    ids = tok.encode(text)
    for chunk in (1, 3):
        deltas = _stream(tok, ids, skip, chunk)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        if "\ufffd" not in tok.decode(ids):
            assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_held_back(tok: Tokenizer) -> None:
    text = "👨‍👩‍👧 表情 😀"
    ids = tok.encode(text)
    assert len(ids) >= 2 * len(text)  # characters split into byte-level pieces
    detok = IncrementalDetokenizer(tok)
    held = 0
    for token_id in ids:
        delta = detok.add(token_id)
        held += delta == ""
        assert "\ufffd" not in delta
        # Only a short window is ever decoded (no full re-decode per step).
        assert len(detok.token_ids) - detok.prefix_offset <= 8
    assert held > 0
    assert detok.flush() == "" and detok.text == text


def test_flush_emits_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀")
    truncated = ids[:-1]  # drop the last byte of the emoji
    detok = IncrementalDetokenizer(tok)
    streamed = detok.add(truncated)
    tail = detok.finish()
    assert "\ufffd" not in streamed and tail.endswith("\ufffd")
    assert streamed + tail == tok.decode(truncated)


def test_random_ids_concatenate_to_decode(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_prompt_context_is_not_emitted(tok: Tokenizer) -> None:
    prompt = tok.encode("<|im_start|>assistant\n中")
    gen = tok.encode("文 and more 😀")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    text = "".join(detok.add(i) for i in gen) + detok.flush()
    assert text == tok.decode(gen) and detok.token_ids == gen


def test_add_accepts_numpy_and_tensor_ids(tok: Tokenizer) -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    ids = tok.encode("abc 你好")
    detok = IncrementalDetokenizer(tok)
    detok.add(np.int64(ids[0]))
    detok.add(torch.tensor(ids[1]))
    detok.add(torch.tensor(ids[2:4]))
    detok.add(np.array(ids[4:]))
    assert detok.text + detok.flush() == "abc 你好" and detok.token_ids == ids
