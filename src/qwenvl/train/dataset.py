"""Streaming training data: an index of the JSON-lines file, and samples decoded on demand.

The index pass reads every line once: it checks it (``data.parse_line``), and counts its tokens
from the text and the media headers (``Processor.media_tokens``: a PNG's chunks read directly,
other pictures through PIL's lazy open, PyAV's container header; no pixel is decoded). It keeps a
byte offset and the lengths per sample, which is all packing and the step plan need. The pass
must start training within seconds on tens of thousands of lines, so what repeats is worked out
once per pass (``data.TokenCounter``: renders, text pieces, picture sizes; ``data.MediaPaths``:
resolved folders), and the data workers share the lines, a chunk each.

Pixels exist only while a ``DataLoader`` worker prepares the step that trains on them, so memory
is bounded by the prefetch depth, not by the dataset. Every problem of the file (bad lines,
unreadable or refused media) is reported at once, before training.

A decoded sample must have the length the index gave it (otherwise packing would differ from
what was planned): a mismatch is an error naming the line, never a silent difference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from qwenvl.errors import MediaError, PromptError
from qwenvl.processing.prompt import Processor
from qwenvl.train.data import (
    DataError,
    MediaPaths,
    Piece,
    Sample,
    TokenCounter,
    encode_pair,
    encode_piece,
    iter_lines,
    pair_lengths,
    parse_line,
    raise_errors,
    record_pieces,
)
from qwenvl.train.packing import Batch, collate

logger = logging.getLogger(__name__)

_CHUNK = 64  # lines per index task handed to a worker


@dataclass
class DataIndex:
    """One entry per training unit (an SFT sample, or a DPO pair): where its line is, which part
    of the line (a piece of a split conversation), and the tokens of each of its samples."""

    path: Path
    kind: str  # "sft" or "dpo"
    allow_outside: bool = False
    offsets: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    lengths: list[tuple[int, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, line: int, offset: int, entries: list[tuple[Piece, tuple[int, ...]]]) -> None:
        for piece, lengths in entries:
            self.offsets.append(offset)
            self.lines.append(line)
            self.pieces.append(piece)
            self.lengths.append(lengths)


IndexEntry = tuple[int, int, list[tuple[Piece, tuple[int, ...]]] | str]  # line, offset, result


def index_line(
    processor: Processor,
    raw: bytes,
    root: Path,
    kind: str,
    max_len: int | None,
    overlong: str,
    allow_outside: bool,
    counter: TokenCounter | None = None,
    where: MediaPaths | None = None,
) -> list[tuple[Piece, tuple[int, ...]]]:
    """Check one line and count its samples' tokens (headers only). ``counter`` and ``where``
    (for ``root``) carry what a pass has already worked out from line to line."""
    record = parse_line(raw, root, kind, allow_outside, where=where)
    try:
        if kind == "dpo":
            chosen, rejected = pair_lengths(processor, record, counter)
            if max_len is not None and chosen + rejected > max_len:
                raise DataError(
                    f"chosen + rejected take {chosen + rejected} tokens, more than the budget "
                    f"of {max_len}"
                )
            return [(None, (chosen, rejected))]
        pieces = record_pieces(processor, record, max_len, overlong, counter)
        return [(p, (n,)) for p, n in pieces]
    except (PromptError, MediaError) as e:
        raise DataError(str(e)) from None


class _IndexTasks(Dataset):
    """Chunks of lines to index, so DataLoader workers can share the pass."""

    def __init__(self, lines: list[tuple[int, int]], index_one: Callable[[bytes], Any], path: Path):
        self.chunks = [lines[i : i + _CHUNK] for i in range(0, len(lines), _CHUNK)]
        self.index_one, self.path = index_one, path

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> list[IndexEntry]:
        out: list[IndexEntry] = []
        with open(self.path, "rb") as f:
            for line, offset in self.chunks[k]:
                f.seek(offset)
                try:
                    out.append((line, offset, self.index_one(f.readline())))
                except DataError as e:
                    out.append((line, offset, str(e)))
        return out


def index_entries(
    path: str | Path,
    processor: Processor,
    kind: str = "sft",
    max_len: int | None = None,
    overlong: str = "reject",
    allow_outside: bool = False,
    *,
    workers: int = 0,
    share: tuple[int, int] = (0, 1),
) -> list[IndexEntry]:
    """Index this process's share of the lines (every ``share[1]``-th from ``share[0]``)."""
    path = Path(path)
    lines = [(n, off) for n, off, _ in iter_lines(path)]
    mine = lines[share[0] :: share[1]]

    counter, where = TokenCounter(processor), MediaPaths(path.parent, allow_outside)

    def one(raw: bytes) -> Any:  # each worker process has its own copy of the two caches
        return index_line(processor, raw, path.parent, kind, max_len, overlong, allow_outside,
                          counter, where)  # fmt: skip

    loader = DataLoader(
        _IndexTasks(mine, one, path), batch_size=None, num_workers=workers, collate_fn=_same
    )
    return [entry for chunk in loader for entry in chunk]


def build_index(
    path: str | Path, kind: str, allow_outside: bool, entries: Sequence[IndexEntry]
) -> DataIndex:
    """Entries (from every share) -> the index, or one DataError listing every bad line."""
    path = Path(path)
    index = DataIndex(path, kind, allow_outside)
    errors = []
    for line, offset, result in sorted(entries):
        if isinstance(result, str):
            errors.append(f"{path}:{line}: {result}")
        else:
            index.add(line, offset, result)
    raise_errors(errors)
    if not index.offsets:
        raise DataError(f"{path}: no samples")
    return index


def index_file(
    path: str | Path,
    processor: Processor,
    kind: str = "sft",
    max_len: int | None = None,
    overlong: str = "reject",
    allow_outside: bool = False,
    workers: int = 0,
) -> DataIndex:
    """Check every line of ``path`` and index it (one process; see :func:`index_entries`)."""
    entries = index_entries(
        path, processor, kind, max_len, overlong, allow_outside, workers=workers
    )
    return build_index(path, kind, allow_outside, entries)


def _same(x: Any) -> Any:
    return x


class Units(Sequence):
    """The training units of an index, decoded when asked for: ``units[i]`` is ``[sample]``
    (SFT) or ``[chosen, rejected]`` (DPO)."""

    def __init__(self, index: DataIndex, processor: Processor) -> None:
        self.index, self.processor = index, processor
        self._file: Any = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> list[Sample]:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        ix = self.index
        try:
            raw = self._read(ix.offsets[i])
            record = parse_line(raw, ix.path.parent, ix.kind, ix.allow_outside)
            if ix.kind == "dpo":
                samples = list(encode_pair(self.processor, record, ix.lines[i]))
            else:
                samples = [encode_piece(self.processor, record, ix.pieces[i])]
        except (PromptError, MediaError, DataError) as e:
            msg = str(e).partition(": ")[2] if str(e).startswith("line ") else str(e)
            raise DataError(f"{ix.path}:{ix.lines[i]}: {msg}") from None
        got = tuple(len(s) for s in samples)
        if got != ix.lengths[i]:
            raise DataError(
                f"{ix.path}:{ix.lines[i]}: decoded to {got} tokens, but its headers gave "
                f"{ix.lengths[i]} (was a file changed during training?)"
            )
        for s in samples:
            s.line = ix.lines[i]
        return samples

    def __iter__(self) -> Iterator[list[Sample]]:
        return (self[i] for i in range(len(self)))

    def _read(self, offset: int) -> bytes:
        if self._pid != os.getpid():  # a DataLoader worker opens its own handle
            self._file, self._pid = open(self.index.path, "rb"), os.getpid()  # noqa: SIM115
        self._file.seek(offset)
        return self._file.readline()


@dataclass
class StepShare:
    """One rank's part of one optimizer step, ready for the model. ``weights[k]`` is 0 for a
    padding micro-batch (a rank with less data still runs as many passes as the others)."""

    step: int
    batches: list[Batch] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    num_targets: int = 0  # of the real micro-batches
    samples: int = 0
    media: int = 0  # real micro-batches with pictures or videos
    error: str | None = None


class StepData(Dataset):
    """``data[step]`` -> this rank's :class:`StepShare` of that step (see ``plan.StepPlan``)."""

    def __init__(
        self,
        units: Units,
        share: Callable[[int], tuple[list[list[list[int]]], int, list[list[int]]]],
        pad_id: int,
    ) -> None:
        self.units, self.share, self.pad_id = units, share, pad_id

    def __len__(self) -> int:  # the sampler says which steps; the length is not used
        return 0

    def __getitem__(self, step: int) -> StepShare:
        micro_batches, padding, spare = self.share(step)
        out = StepShare(step)
        try:
            for micro in micro_batches:
                out.batches.append(self._collate(micro))
                out.weights.append(1.0)
                out.num_targets += out.batches[-1].num_targets
                out.samples += sum(len(row) for row in micro)
                b = out.batches[-1]
                out.media += b.pixel_values is not None or b.pixel_values_videos is not None
            pad = out.batches[0] if out.batches else self._collate(spare) if padding else None
        except DataError as e:  # reported by the trainer, not as a worker traceback
            return StepShare(step, error=str(e))
        out.batches += [pad] * padding  # type: ignore[list-item]
        out.weights += [0.0] * padding
        return out

    def _collate(self, micro: list[list[int]]) -> Batch:
        return collate([[s for i in row for s in self.units[i]] for row in micro], self.pad_id)


def step_loader(data: StepData, start: int, stop: int, workers: int, prefetch: int) -> DataLoader:
    """Steps ``start..stop-1`` in order, prepared ``prefetch`` steps ahead per worker."""
    return DataLoader(
        data,
        batch_size=None,
        sampler=range(start, stop),
        num_workers=workers,
        prefetch_factor=prefetch if workers else None,
        collate_fn=_same,
        generator=torch.Generator().manual_seed(0),  # not a draw from the training RNG stream
    )


def load_sft(
    path: str | Path,
    processor: Processor,
    max_len: int | None = None,
    overlong: str = "reject",
) -> list[Sample]:
    """Check, then encode, every conversation of a JSON-lines file, all in memory (tests and
    small files; training streams them)."""
    units = Units(index_file(path, processor, "sft", max_len, overlong), processor)
    return [s for unit in units for s in unit]


def load_dpo(path: str | Path, processor: Processor, max_len: int | None = None) -> list:
    """Check, then encode, every (prompt, chosen, rejected) line as ``[chosen, rejected]``."""
    return list(Units(index_file(path, processor, "dpo", max_len), processor))
