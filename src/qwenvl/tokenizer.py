"""Tokenizer loading, streaming-safe detokenization, and a tiny Qwen-style tokenizer builder.

`Tokenizer` wraps a `tokenizers.Tokenizer` read from a checkpoint's ``tokenizer.json`` (plus the
eos/pad/added-token settings of ``tokenizer_config.json``) and encodes exactly like transformers'
``Qwen2Tokenizer``: special tokens written in the text are parsed as special tokens and no BOS is
added. `IncrementalDetokenizer` turns a stream of generated ids into text deltas without ever
emitting half of a multi-byte UTF-8 character. `train_qwen_style_tokenizer` and
`save_tokenizer_files` build a small byte-level BPE with Qwen's exact normalizer, pre-tokenizer,
decoder and special tokens, for test fixtures and demo checkpoints.
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers.models import BPE

from qwenvl.errors import ConfigError, ContextLengthError, PromptError

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenizer split pattern (applied with behaviour "isolated", before ByteLevel).
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Added tokens in the released id order (151643..151664); the first 14 are special.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_NON_SPECIAL_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
_REPLACEMENT_CHAR = "\ufffd"
# Prompts of up to this many characters are tokenized at once; longer ones are first counted in
# chunks of _CHUNK_CHARS, stopping at the limit. A chunk cut inside a word may count a few
# tokens more than the whole would (_HARD_SPLIT_SLACK each), so those cuts never refuse a prompt
# that fits.
_EXACT_COUNT_CHARS = 1 << 18
_CHUNK_CHARS = 1 << 15
_CHUNKS_PER_BATCH = 8
_HARD_SPLIT_SLACK = 8
# transformers' Qwen2Tokenizer defaults, used when tokenizer_config.json does not set a token.
_DEFAULT_EOS = "<|endoftext|>"
_DEFAULT_PAD = "<|endoftext|>"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(f"bad special token entry in tokenizer_config.json: {value!r}")


class Tokenizer:
    """A checkpoint's tokenizer: byte-level BPE plus added (special) tokens.

    Args:
        backend: the `tokenizers.Tokenizer` doing the work.
        eos_token: the end-of-sequence token (must be in the vocabulary), or None.
        pad_token: the padding token (must be in the vocabulary), or None.
        model_max_length: the context length the tokenizer config declares, if any.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str | None = _DEFAULT_EOS,
        pad_token: str | None = _DEFAULT_PAD,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = backend
        # Like transformers' split_special_tokens=False: "<|im_end|>" in text is one special token.
        self.backend.encode_special_tokens = False
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.eos_token_id = None if eos_token is None else self.require_id(eos_token)
        self.pad_token_id = None if pad_token is None else self.require_id(pad_token)
        self.model_max_length = model_max_length

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` if present) from a folder."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"no tokenizer.json in {folder}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust loader raises plain Exception subclasses
            raise ConfigError(f"cannot load {tok_file}: {e}") from e

        cfg_file = folder / "tokenizer_config.json"
        cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
        _add_missing_tokens(backend, cfg.get("added_tokens_decoder") or {})
        max_len = cfg.get("model_max_length")
        return cls(
            backend,
            eos_token=_token_content(cfg["eos_token"]) if "eos_token" in cfg else _DEFAULT_EOS,
            pad_token=_token_content(cfg["pad_token"]) if "pad_token" in cfg else _DEFAULT_PAD,
            # transformers writes a huge float sentinel when the length is unknown.
            model_max_length=max_len if isinstance(max_len, int) and max_len < 1 << 40 else None,
        )

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of `text`, nothing prepended.

        ``special=True`` parses special-token strings written in the text (``<|im_end|>``) as the
        special tokens, as transformers does: only for trusted text (a raw prompt, a template).
        ``special=False`` encodes them as the plain characters they are.
        """
        return self._encodings([text], special)[0].ids

    def encode_marked(
        self,
        text: str,
        control: Sequence[tuple[int, int]] | None = None,
        *,
        limit: int | None = None,
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of `text` where only the ``control`` spans are special.

        ``control`` lists ``(start, end)`` spans of `text` that each hold one special token (the
        chat template's own markers); everything between them is plain text, so a special-token
        string typed in a message stays text. ``None`` parses every special-token string (trusted
        text). Encoding the pieces apart gives the same ids as encoding the whole, because the
        backend splits at special tokens before anything else.

        ``limit``: raise `ContextLengthError` as soon as the text is known to need more tokens,
        without tokenizing all of a huge text first.
        """
        if control is None:
            spans = [(m.start(), m.end()) for m in self._special_pattern.finditer(text)]
        else:
            spans = sorted(control)
        pieces: list[tuple[int, int]] = []  # plain text between the control tokens
        pos = 0
        for a, b in spans:
            pieces.append((pos, a))
            pos = b
        pieces.append((pos, len(text)))
        if limit is not None:
            self._refuse_over(text, pieces, len(spans), limit)
        encs = self._encodings([text[a:b] for a, b in pieces], special=False)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for k, ((a, _), enc) in enumerate(zip(pieces, encs)):
            ids.extend(enc.ids)
            offsets.extend((a + s, a + e) for s, e in enc.offsets)
            if k < len(spans):
                s, e = spans[k]
                ids.append(self.require_special(text[s:e]))
                offsets.append((s, e))
        return ids, offsets

    def require_special(self, token: str) -> int:
        """The id of the special token `token`; a `PromptError` if it is not one."""
        token_id = self.special_tokens.get(token)
        if token_id is None:
            raise PromptError(f"{token!r} is not a special token of this tokenizer")
        return token_id

    def _encodings(self, texts: Sequence[str], special: bool) -> list[tokenizers.Encoding]:
        # encode_batch releases the GIL (encode does not): a long prompt tokenized in a worker
        # thread must not stall the server's event loop.
        for text in texts:
            at = lone_surrogate(text)
            if at is not None:
                raise PromptError(surrogate_message(text, at))
        backend = self.backend if special or not self._holds_special(texts) else self._plain_backend
        return backend.encode_batch(list(texts), add_special_tokens=False)

    def _holds_special(self, texts: Sequence[str]) -> bool:
        """Whether the two backends could differ on `texts`: only where a special-token string
        occurs (found as the backend finds it: special tokens that match normalised text, which
        no Qwen tokenizer has, count as always present). Texts without one take the main backend,
        so the plain copy (0.1 s to build) is made only when a message holds such a string."""
        if self._special_normalized:
            return True
        return any(self._special_pattern.search(text) for text in texts)

    def _refuse_over(
        self, text: str, pieces: list[tuple[int, int]], extra: int, limit: int
    ) -> None:
        """Raise `ContextLengthError` if `text`'s pieces surely need more than `limit` tokens.

        First a bound from characters alone (no token is longer than ``max_token_chars``), which
        costs nothing; then, for texts long enough to matter, a count over chunks that stops once
        past the limit, so the work is bounded by the limit, not by the text's length.
        """
        chars = sum(b - a for a, b in pieces)
        # The floor is at most chars + extra tokens: only a text longer than that can fail it, so
        # a short prompt never reads the vocabulary for max_token_chars (0.1 s).
        floor = -(-chars // self.max_token_chars) + extra if chars + extra > limit else 0
        if floor > limit:
            raise ContextLengthError(
                f"the prompt's text is {chars} characters, at least {floor} tokens, but at most "
                f"{limit} fit; shorten it"
            )
        if chars <= _EXACT_COUNT_CHARS:
            return
        counted, hard = extra, 0
        chunks = [c for a, b in pieces for c in self._chunks(text, a, b)]
        for k in range(0, len(chunks), _CHUNKS_PER_BATCH):
            batch = chunks[k : k + _CHUNKS_PER_BATCH]
            hard += sum(h for _, _, h in batch)
            encs = self._encodings([text[a:b] for a, b, _ in batch], special=False)
            counted += sum(len(enc.ids) for enc in encs)
            if counted - _HARD_SPLIT_SLACK * hard > limit:
                raise ContextLengthError(
                    f"the prompt's text ({chars} characters) needs more than {limit} tokens, "
                    "the most that fit; shorten it"
                )

    def _chunks(self, text: str, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """``(a, b, hard)`` chunks of ``text[start:end]``: cut before a space that starts a word
        (where Qwen's pre-tokenizer cuts too, so the counts add up exactly), else anywhere
        (``hard``: the count may be off by a few tokens there)."""
        a = start
        while end - a > _CHUNK_CHARS:
            b = a + _CHUNK_CHARS
            cut = self._safe_cut(text, b - 1024, b) if self._qwen_pretokenizer else None
            yield a, cut or b, cut is None
            a = cut or b
        if a < end:
            yield a, end, False

    @staticmethod
    def _safe_cut(text: str, lo: int, hi: int) -> int | None:
        for j in range(hi - 1, lo, -1):
            if text[j] == " " and text[j - 1].isalnum() and text[j + 1].isalpha():
                return j
        return None

    @functools.cached_property
    def _plain_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that reads special-token strings as plain text."""
        plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
        plain.encode_special_tokens = True
        return plain

    @functools.cached_property
    def special_tokens(self) -> dict[str, int]:
        """Special (control) token strings and their ids."""
        added = self.backend.get_added_tokens_decoder()
        return {t.content: i for i, t in added.items() if t.special}

    @functools.cached_property
    def _special_normalized(self) -> bool:
        added = self.backend.get_added_tokens_decoder().values()
        return any(t.special and t.normalized for t in added)

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern[str]:
        return special_token_pattern(self.special_tokens)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters of the longest token (byte-level tokens hold at most one character per
        byte), so ``len(text) / max_token_chars`` tokens is a floor for any text."""
        lengths = [len(t) for t in self.backend.get_vocab(with_added_tokens=True)]
        return max(lengths, default=1)

    @functools.cached_property
    def _qwen_pretokenizer(self) -> bool:
        """Whether the backend splits words with Qwen2's pattern (what `_chunks` relies on)."""
        pre = json.loads(self.backend.to_str()).get("pre_tokenizer") or {}
        splits = pre.get("pretokenizers", [pre])
        return any((p.get("pattern") or {}).get("Regex") == QWEN_SPLIT_REGEX for p in splits)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence becomes U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of `token` (a vocabulary entry or an added token), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def require_id(self, token: str) -> int:
        """The id of `token`; a `ConfigError` if the tokenizer lacks it."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"the tokenizer has no token {token!r}, which qwenvl needs")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(hf_tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (those `skip_special_tokens` drops)."""
        return frozenset(self.special_tokens.values())


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds a lone UTF-16 surrogate (which JSON's ``\\ud800`` can spell but no
    UTF-8 text can hold), or None. The tokenizer would fail on one with a bare TypeError."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def surrogate_message(text: str, at: int) -> str:
    return (
        f"the text holds a lone UTF-16 surrogate ({text[at]!r} at character {at}), which is not "
        "valid Unicode"
    )


def special_token_pattern(tokens: Iterable[str]) -> re.Pattern[str]:
    """A regex matching any of `tokens`, longest first (so no token hides a longer one)."""
    ordered = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in ordered) or r"(?!x)x")


def _add_missing_tokens(backend: tokenizers.Tokenizer, added: dict[str, Any]) -> None:
    """Add tokenizer_config.json's added tokens that tokenizer.json lacks, as transformers does."""
    for key, entry in sorted(added.items(), key=lambda kv: int(kv[0])):
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise ConfigError(f"bad added_tokens_decoder entry {key!r} in tokenizer_config.json")
        content = entry["content"]
        if backend.token_to_id(content) is not None:
            continue
        token = AddedToken(
            content,
            single_word=bool(entry.get("single_word", False)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            normalized=bool(entry.get("normalized", False)),
            special=bool(entry.get("special", True)),
        )
        backend.add_tokens([token])
        if backend.token_to_id(content) != int(key):
            logger.warning(
                "added token %r got id %s, config says %s",
                content,
                backend.token_to_id(content),
                key,
            )


class IncrementalDetokenizer:
    """Streaming decoder: feed generated ids, get text deltas that are safe to show.

    Only a short window of ids is decoded per step (vLLM's prefix/read offsets): ``prefix_offset``
    marks where the window starts (for context, e.g. leading spaces), ``read_offset`` where the text
    already emitted ends. A delta whose text ends in U+FFFD (an incomplete UTF-8 sequence) is held
    back until later ids complete it; `flush` emits whatever is left. The concatenation of all
    deltas equals ``tokenizer.decode(ids, skip_special_tokens)`` of all the ids fed.

    Args:
        tokenizer: the `Tokenizer` to decode with.
        skip_special_tokens: drop special tokens from the text.
        prompt_ids: ids before the first fed id, used only as decoding context (never emitted).
    """

    _CONTEXT_TOKENS = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = False,
        prompt_ids: Sequence[int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids or [])
        self._num_prompt = len(self._ids)
        self.read_offset = len(self._ids)
        self.prefix_offset = max(self.read_offset - self._CONTEXT_TOKENS, 0)
        self._chunks: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        """The ids fed so far (prompt context excluded)."""
        return self._ids[self._num_prompt :]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def add(self, ids: int | Iterable[int]) -> str:
        """Append one id or several; return the newly complete text (maybe empty)."""
        try:  # ints, numpy integers and one-element integer tensors
            self._ids.append(operator.index(ids))  # type: ignore[arg-type]
        except TypeError:
            self._ids.extend(int(i) for i in ids)  # type: ignore[union-attr]
        return self._step(final=False)

    def flush(self) -> str:
        """Emit the held-back tail (an incomplete character decodes to U+FFFD, as in `decode`)."""
        return self._step(final=True)

    finish = flush

    def _step(self, *, final: bool) -> str:
        if self.read_offset >= len(self._ids):
            return ""
        ids, start, skip = self._ids, self.prefix_offset, self.skip_special_tokens
        prefix_text = self.tokenizer.decode(ids[start : self.read_offset], skip)
        new_text = self.tokenizer.decode(ids[start:], skip)
        # Hold back an unfinished character; also wait while the new ids add no text at all.
        held = len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)
        if held and not final:
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self._ids)
        if delta:
            self._chunks.append(delta)
        return delta


def train_qwen_style_tokenizer(corpus: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Train a tiny byte-level BPE shaped exactly like Qwen2's tokenizer.

    Args:
        corpus: training texts.
        vocab_size: size of the BPE vocabulary (≥ 256 byte symbols), before the 22 added tokens
            (`QWEN_SPECIAL_TOKENS` then `QWEN_NON_SPECIAL_TOKENS`) appended with contiguous ids.
            A small corpus may yield fewer merges, so fewer BPE entries.

    Returns:
        The trained `tokenizers.Tokenizer` with Qwen's NFC normalizer, split regex + ByteLevel
        pre-tokenizer, ByteLevel post-processor and decoder.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (the byte alphabet), got {vocab_size}")
    tok = tokenizers.Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in QWEN_NON_SPECIAL_TOKENS]
    )

    # Match the released tokenizer.json field for field (the Python constructors drop some args).
    data = json.loads(tok.to_str())
    data["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    data["model"]["continuing_subword_prefix"] = ""
    data["model"]["end_of_word_suffix"] = ""
    return tokenizers.Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def save_tokenizer_files(
    tok: tokenizers.Tokenizer,
    out_dir: str | os.PathLike[str],
    *,
    chat_template: str | None,
    model_max_length: int = 32768,
) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that loads as ``Qwen2Tokenizer``.

    The config follows the released Qwen2-VL one: eos ``<|im_end|>``, pad ``<|endoftext|>``, no
    BOS, left padding, and an ``added_tokens_decoder`` listing every added token.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    added = tok.get_added_tokens_decoder()
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(added.items())
        },
        "additional_special_tokens": [
            t.content
            for _, t in sorted(added.items())
            if t.special and t.content != "<|endoftext|>"
        ],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
