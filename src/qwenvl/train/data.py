"""Training data: JSON-lines conversations -> token ids, M-RoPE positions, pixels and a loss mask.

One line is one conversation in the message format ``LLM.chat`` takes::

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                              {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}],
     "min_pixels": 3136, "max_pixels": 200704}          # optional defaults for the line's images

Media paths are relative to the file; URLs, ``data:`` URIs and base64 strings pass through. The
loss covers the assistant turns only: each turn's content and its ``<|im_end|>``. A DPO line has
``messages`` (the prompt) plus ``chosen`` and ``rejected`` (a string, a content list or an
assistant message); the loss then covers the final reply only.

The whole file is checked before anything is encoded, and every error names its line.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwenvl.errors import MediaError, PromptError, QwenVLError
from qwenvl.processing.image import ProcessedImage, ProcessedVideo
from qwenvl.processing.media import image_size
from qwenvl.processing.prompt import IMAGE_OPTIONS, Processor, _expand, _strip_payloads

ROLES = ("system", "user", "assistant", "tool")
LINE_OPTIONS = ("min_pixels", "max_pixels")
END = "<|im_end|>"
_REMOTE = re.compile(r"^(https?://|data:|file://)", re.IGNORECASE)


class DataError(QwenVLError, ValueError):
    """A training file (or one of its lines) cannot be used."""


@dataclass
class Sample:
    """One encoded conversation. ``targets[t]`` is True where token ``t`` is trained on (it is
    predicted from position ``t - 1``); the first token never is."""

    token_ids: list[int]
    targets: torch.Tensor  # [L] bool
    positions: torch.Tensor  # [3, L] int64
    images: list[ProcessedImage] = field(default_factory=list)
    videos: list[ProcessedVideo] = field(default_factory=list)
    line: int = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_targets(self) -> int:
        return int(self.targets.sum())


# --- reading and checking ----------------------------------------------------------------------
def read_jsonl(
    path: str | Path, kind: str = "sft", allow_outside: bool = False
) -> list[tuple[int, dict[str, Any]]]:
    """Parse and check every line of ``path``; returns ``(line number, record)`` pairs with media
    paths made absolute. Raises one DataError listing every problem (``file:line: message``)."""
    path = Path(path)
    records, errors = [], []
    for lineno, _, raw in iter_lines(path):
        try:
            records.append((lineno, parse_line(raw, path.parent, kind, allow_outside)))
        except DataError as e:
            errors.append(f"{path}:{lineno}: {e}")
    raise_errors(errors)
    if not records:
        raise DataError(f"{path}: no samples")
    return records


def iter_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, raw line)`` of every non-blank line."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from e
    with f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, offset, raw
            offset += len(raw)


def parse_line(
    raw: bytes,
    root: Path,
    kind: str,
    allow_outside: bool = False,
    *,
    where: MediaPaths | None = None,
) -> dict[str, Any]:
    """One JSON line -> its checked record (media paths absolute, under ``root`` unless
    ``allow_outside``). A line that is not UTF-8 is named by its byte position, never quoted.
    ``where``: a :class:`MediaPaths` for ``root`` kept over many lines (an index pass), so each
    media folder is resolved once."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start} of the line)") from None
    try:
        record = json.loads(text)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise DataError("expected a JSON object")
    return _check_record(record, where or MediaPaths(root, allow_outside), kind)


def raise_errors(errors: list[str]) -> None:
    """One DataError listing every problem found, or nothing."""
    if errors:
        n = f"{len(errors)} problem{'s' if len(errors) > 1 else ''}"
        raise DataError(f"invalid training data ({n}):\n" + "\n".join(errors))


class MediaPaths:
    """Where relative media paths start (the data file's folder), whether they may leave it, and
    the folders already resolved: following every link of every picture's path took most of the
    index pass's path checks, though a data set's pictures share a few folders."""

    def __init__(self, root: Path, allow_outside: bool) -> None:
        self.root, self.allow_outside = root, allow_outside
        self._real_root: Path | None = None
        self._inside: dict[Path, bool] = {}  # folder -> its real path is under the real root

    @property
    def real_root(self) -> Path:
        if self._real_root is None:
            self._real_root = self.root.resolve()
        return self._real_root

    def inside(self, path: Path) -> bool:
        """``path.resolve().is_relative_to(self.real_root)`` for an existing ``path``. A name
        that is not a link resolves to its folder's real path plus the name, so a folder found
        under the root answers for each file in it (an lstat instead of one per component)."""
        folder = path.parent
        if path.name in ("", ".", "..") or folder == path or path.is_symlink():
            return path.resolve().is_relative_to(self.real_root)
        known = self._inside.get(folder)
        if known is None:
            if len(self._inside) > 10_000:
                self._inside.clear()
            known = self._inside[folder] = folder.resolve().is_relative_to(self.real_root)
        return known or path.resolve().is_relative_to(self.real_root)


def _check_record(record: dict[str, Any], root: MediaPaths, kind: str) -> dict[str, Any]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list")
    defaults = {k: record[k] for k in LINE_OPTIONS if record.get(k) is not None}
    for k, v in defaults.items():
        if not isinstance(v, int) or v <= 0:
            raise DataError(f"{k} must be a positive integer")
    out = dict(record)
    out["messages"] = _check_messages(messages, root, defaults, "messages")
    if kind == "dpo":
        if out["messages"][-1]["role"] == "assistant":
            raise DataError("a DPO prompt must not end with an assistant message")
        for key in ("chosen", "rejected"):
            if key not in record:
                raise DataError(f"a DPO line needs '{key}'")
            reply = _as_assistant(record[key], key)
            out[key] = _check_messages([reply], root, defaults, key)[0]
    elif not any(m["role"] == "assistant" and _has_content(m) for m in out["messages"]):
        raise DataError("no assistant message to train on")
    return out


def _as_assistant(reply: Any, where: str) -> dict[str, Any]:
    if isinstance(reply, (str, list)):
        return {"role": "assistant", "content": reply}
    if isinstance(reply, dict) and reply.get("role", "assistant") == "assistant":
        return {**reply, "role": "assistant"}
    raise DataError(f"'{where}' must be a string, a content list or an assistant message")


def _has_content(message: dict[str, Any]) -> bool:
    content = message.get("content")
    return bool(content) or bool(message.get("tool_calls"))


def _check_messages(
    messages: list[Any], root: MediaPaths, defaults: dict[str, Any], where: str
) -> list[dict[str, Any]]:
    out = []
    seen_user = False
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{at}: must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if role == "assistant" and not seen_user and where == "messages":
            raise DataError(f"{at}: an assistant message before any user message")
        seen_user = seen_user or role == "user"
        content = m.get("content")
        if isinstance(content, list):
            items = []
            for j, item in enumerate(content):
                if not isinstance(item, dict):
                    raise DataError(f"{at}.content[{j}]: must be an object")
                item = _check_item(item, root, defaults, f"{at}.content[{j}]")
                if role == "assistant" and _media_kind(item):
                    raise DataError(f"{at}.content[{j}]: images and videos belong in user turns")
                items.append(item)
            m = {**m, "content": items}
        elif content is not None and not isinstance(content, str):
            raise DataError(f"{at}: content must be a string or a list of items")
        elif content is None and role != "assistant":
            raise DataError(f"{at}: a {role} message needs content")
        out.append(m)
    return out


def _media_kind(item: dict[str, Any]) -> str | None:
    for kind in ("image", "video"):
        if item.get("type") in (kind, f"{kind}_url") or kind in item or f"{kind}_url" in item:
            return kind
    return None


def _check_item(item: dict[str, Any], root: MediaPaths, defaults: dict[str, Any], at: str) -> dict:
    kind = _media_kind(item)
    if kind is None:
        if item.get("type", "text") == "text" and not isinstance(item.get("text"), str):
            raise DataError(f"{at}: a text item needs a 'text' string")
        return item
    item = dict(item)
    key = kind if kind in item else f"{kind}_url"
    source = item.get(key)
    if isinstance(source, dict):
        source = source.get("url")
    if source is None:
        raise DataError(f"{at}: {kind} item has no {kind} data")
    if kind == "image":
        for k, v in defaults.items():
            item.setdefault(k, v)
        bad = [k for k in IMAGE_OPTIONS if k in item and not isinstance(item[k], (int, float))]
        if bad:
            raise DataError(f"{at}: {', '.join(bad)} must be numbers")
    resolved = _resolve(source, root, at)
    if isinstance(item.get(key), dict):
        item[key] = {**item[key], "url": resolved}
    else:
        item[key] = resolved
    return item


def _resolve(source: Any, where: MediaPaths, at: str) -> Any:
    """A path relative to the data file becomes absolute; URLs and base64 pass through. A local
    file outside the data folder (symlinks followed) is refused unless ``where.allow_outside``:
    a data file from elsewhere must not make training read, and later echo, arbitrary files."""
    if isinstance(source, list):  # a video given as frames
        return [_resolve(s, where, at) for s in source]
    if not isinstance(source, str) or len(source) > 1024:
        return source
    if source[:7].lower() == "file://":
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(source).path))
    elif _REMOTE.match(source):
        return source
    else:
        path = Path(source).expanduser()
        path = path if path.is_absolute() else where.root / path
    if not path.exists():
        if "." in Path(source).name or "/" in source or "\\" in source:
            raise DataError(f"{at}: file not found: {path}")
        return source  # a short base64 payload
    if not where.allow_outside and not where.inside(path):
        raise DataError(
            f"{at}: {path} is outside the data folder {where.real_root} "
            "(--allow-outside-paths allows it)"
        )
    return str(path)


# --- encoding ----------------------------------------------------------------------------------
def encode_conversation(
    processor: Processor, messages: list[dict[str, Any]], *, last_turn_only: bool = False
) -> Sample:
    """Tokenise one conversation; targets are the assistant turns (or only the last one)."""
    prompt = processor.prepare_chat(messages, add_generation_prompt=False)
    text = prompt.text or ""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (last_turn_only and i != len(messages) - 1):
            continue
        head = processor.render(messages[:i], add_generation_prompt=True) if i else ""
        upto = processor.render(messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(upto) and upto.startswith(head)):
            raise PromptError("the chat template does not render turns as prefixes")
        start, stop = len(head), len(upto)
        end = text.rfind(END, start, stop)
        spans.append((start, end + len(END) if end >= 0 else stop))
    # the same encoding as prepare_chat's: message text is plain text, markers are special
    ids, offsets = processor.encode_chat(
        processor.render_marked(messages, add_generation_prompt=False)
    )
    flags = [any(s <= a and b <= e for s, e in spans) and b > a for a, b in offsets]
    cfg = processor.config
    for token_id, items in (
        (cfg.image_token_id, prompt.images),
        (cfg.video_token_id, prompt.videos),
    ):
        flags = _expand_flags(ids, flags, token_id, [it.num_tokens for it in items])
        ids = _expand(ids, token_id, [it.num_tokens for it in items], "media")
    if ids != prompt.token_ids:
        raise PromptError("tokenisation with offsets differs from the processor's")
    targets = torch.tensor(flags, dtype=torch.bool)
    targets[0] = False
    return Sample(ids, targets, prompt.positions, prompt.images, prompt.videos)


def _expand_flags(ids: list[int], flags: list[bool], token_id: int, counts: list[int]) -> list:
    out, k = [], 0
    for t, f in zip(ids, flags):
        if t == token_id and k < len(counts):
            out.extend([False] * counts[k])
            k += 1
        else:
            out.append(f)
    return out


def split_rounds(messages: list[dict[str, Any]]) -> tuple[list[dict], list[list[dict]]]:
    """Leading system messages, and the rounds (a user turn and what follows it)."""
    head = []
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        head.append(messages[i])
        i += 1
    rounds: list[list[dict]] = []
    for m in messages[i:]:
        if m["role"] == "user" or not rounds:
            rounds.append([m])
        else:
            rounds[-1].append(m)
    return head, rounds


Piece = tuple[int, int] | None  # rounds [a, b) of ``split_rounds``; None: the whole conversation


class TokenCounter:
    """Token counts from the text and the media headers for one index pass, remembering what
    repeats across lines so each is worked out once.

    ``encode_marked`` encodes the text between the template's markers piece by piece (the
    backend splits at special tokens first), so a chat's ids are its pieces' ids and one id per
    marker, and its count is the sum of theirs: each distinct piece (role headers, a system
    prompt, recurring questions and answers) is tokenized once. Picture sizes are remembered per
    path, as a data set often asks several questions about one picture. Failures are not
    remembered: each line that meets them reports them.
    """

    _MAX_PIECE_CHARS = 512  # longer pieces rarely repeat: not worth their memory
    _MAX_ENTRIES = 50_000

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        cfg = processor.config
        self._pads = (cfg.image_token_id, cfg.video_token_id)
        self._pieces: dict[str, tuple[int, int]] = {}  # text -> (tokens, media placeholders)
        self._sizes: dict[str, tuple[int, int]] = {}
        self._chats: dict[str, int] = {}  # messages (JSON, media stripped) -> text tokens

    def image_size(self, source: Any) -> tuple[int, int]:
        """``image_size(source, policy)``, remembered for a path."""
        if not isinstance(source, str) or len(source) > 1024:  # bytes, frames, base64
            return image_size(source, self.processor.media_policy)
        size = self._sizes.get(source)
        if size is None:
            size = image_size(source, self.processor.media_policy)
            self._remember(self._sizes, source, size)
        return size

    def media(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        return self.processor.media_tokens(messages, self.image_size)

    def text(self, messages: list[dict[str, Any]]) -> int:
        """The ids ``encode_chat(render_marked(messages))`` gives, less its media placeholders:
        the same count, without rendering a conversation seen before (the template sees no
        media path: ``render_marked`` strips them) nor encoding a piece seen before. Messages
        are JSON values, as :func:`parse_line` makes them: their JSON text is the key."""
        try:
            key = json.dumps(_strip_payloads(messages), allow_nan=True)
        except (TypeError, ValueError):
            key = None
        count = self._chats.get(key) if key is not None else None
        if count is None:
            count = self._text(messages)
            if key is not None and len(key) <= 8 * self._MAX_PIECE_CHARS:
                self._remember(self._chats, key, count)
        return count

    def _text(self, messages: list[dict[str, Any]]) -> int:
        proc = self.processor
        chat = proc.render_marked(messages, add_generation_prompt=False)
        text, tokens, pads, pos = chat.text, 0, 0, 0
        for a, b in sorted(chat.control) + [(len(text), len(text))]:
            n, p = self._piece(text[pos:a])
            tokens, pads, pos = tokens + n, pads + p, b
            if a < b:
                tokens += 1
                pads += self._pads.count(proc.tokenizer.require_special(text[a:b]))
        return tokens - pads

    def _piece(self, piece: str) -> tuple[int, int]:
        counts = self._pieces.get(piece)
        if counts is None:
            ids = self.processor.tokenizer.encode(piece, special=False)
            counts = (len(ids), sum(ids.count(t) for t in self._pads))
            if len(piece) <= self._MAX_PIECE_CHARS:
                self._remember(self._pieces, piece, counts)
        return counts

    def _remember(self, cache: dict, key: str, value: Any) -> None:
        if len(cache) >= self._MAX_ENTRIES:
            cache.clear()
        cache[key] = value


class Lengths:
    """Token counts of a conversation and of its parts, from the text and the media headers
    alone: the lengths ``encode_conversation`` will give, without decoding a pixel."""

    def __init__(
        self,
        processor: Processor,
        messages: list[dict[str, Any]],
        counter: TokenCounter | None = None,
    ) -> None:
        self.counter = counter or TokenCounter(processor)
        images, videos = self.counter.media(messages)
        counts = {"image": iter(images), "video": iter(videos)}
        self.media = {}
        for m in messages:
            content = m.get("content")
            items = content if isinstance(content, list) else []
            self.media[id(m)] = sum(next(counts[k]) for k in map(_media_kind, items) if k)

    def __call__(self, messages: list[dict[str, Any]]) -> int:
        return self.counter.text(messages) + sum(self.media[id(m)] for m in messages)


def record_pieces(
    processor: Processor,
    record: dict[str, Any],
    max_len: int | None = None,
    overlong: str = "reject",
    counter: TokenCounter | None = None,
) -> list[tuple[Piece, int]]:
    """The samples one SFT line gives and their lengths: the whole conversation, or
    (``overlong="split"``) pieces cut at turn boundaries, each within ``max_len``. ``counter``:
    an index pass's :class:`TokenCounter`, shared over its lines."""
    messages = record["messages"]
    length = Lengths(processor, messages, counter)
    n = length(messages)
    if max_len is None or n <= max_len:
        return [(None, n)]
    if overlong != "split":
        raise DataError(f"{n} tokens, more than the budget of {max_len}")
    head, rounds = split_rounds(messages)

    def part(a: int, b: int) -> list[dict[str, Any]]:
        return head + [m for r in rounds[a:b] for m in r]

    pieces: list[tuple[Piece, int]] = []
    start = 0
    for k in range(len(rounds)):
        if length(part(start, k + 1)) <= max_len:
            continue
        if k == start or length(part(k, k + 1)) > max_len:
            raise DataError(f"a single turn is longer than the budget of {max_len} tokens")
        pieces.append(((start, k), length(part(start, k))))
        start = k
    pieces.append(((start, len(rounds)), length(part(start, len(rounds)))))
    return [(p, n) for p, n in pieces if _has_reply(part(*p))]  # type: ignore[misc]


def _has_reply(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] == "assistant" for m in messages)


def encode_piece(processor: Processor, record: dict[str, Any], piece: Piece) -> Sample:
    """The sample of one piece (see :func:`record_pieces`) of an SFT line."""
    messages = record["messages"]
    if piece is not None:
        head, rounds = split_rounds(messages)
        messages = head + [m for r in rounds[piece[0] : piece[1]] for m in r]
    return encode_conversation(processor, messages)


def pair_lengths(
    processor: Processor, record: dict[str, Any], counter: TokenCounter | None = None
) -> tuple[int, int]:
    """Lengths of a DPO line's chosen and rejected conversations (headers only)."""
    prompt = record["messages"]
    length = Lengths(processor, prompt + [record["chosen"], record["rejected"]], counter)
    return length(prompt + [record["chosen"]]), length(prompt + [record["rejected"]])


def encode_record(
    processor: Processor,
    record: dict[str, Any],
    lineno: int,
    max_len: int | None = None,
    overlong: str = "reject",
) -> list[Sample]:
    """One SFT line -> one sample, or (``overlong="split"``) several, cut at turn boundaries."""
    try:
        samples = []
        for piece, _ in record_pieces(processor, record, max_len, overlong):
            samples.append(encode_piece(processor, record, piece))
            samples[-1].line = lineno
        return samples
    except (PromptError, MediaError, DataError) as e:
        raise DataError(f"line {lineno}: {e}") from e


def encode_pair(processor: Processor, record: dict[str, Any], lineno: int) -> tuple[Sample, Sample]:
    """A DPO line -> (chosen, rejected), each trained on its final reply only."""
    try:
        out = []
        for key in ("chosen", "rejected"):
            s = encode_conversation(
                processor, record["messages"] + [record[key]], last_turn_only=True
            )
            s.line = lineno
            out.append(s)
        return out[0], out[1]
    except (PromptError, MediaError) as e:
        raise DataError(f"line {lineno}: {e}") from e
