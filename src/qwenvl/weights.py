"""Reading safetensors checkpoints tensor by tensor, straight into their final buffers.

We parse the safetensors header ourselves and ``readinto`` each tensor's bytes: no memory map, so
the file's pages never count toward the process's RSS, and each tensor is materialised once (in the
target dtype) — loading peaks at about the model's size plus its largest single tensor. Writing uses
the safetensors library.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from qwenvl.errors import CheckpointError

SAFE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file, or the shards its index names)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    shards = sorted(folder.glob("model-*.safetensors"))
    if shards:
        raise CheckpointError(f"{folder}: found {len(shards)} shard(s) but no {INDEX_FILE}")
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise CheckpointError(
            f"{folder} holds only pickled PyTorch weights (*.bin); qwenvl loads safetensors only, "
            "because unpickling can run arbitrary code. Convert the checkpoint to safetensors."
        )
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found")


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where tensor data starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: file too short to be safetensors")
            (size,) = struct.unpack("<Q", raw)
            if size > 100_000_000:
                raise CheckpointError(f"{path}: implausible safetensors header size {size}")
            header = json.loads(f.read(size))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + size


def iter_tensor_specs(files: list[Path]) -> Iterator[tuple[str, Path, dict, int]]:
    """(name, file, header entry, data offset) for every tensor of every file."""
    seen: dict[str, Path] = {}
    for path in files:
        header, base = read_header(path)
        for name, spec in header.items():
            if name in seen:
                raise CheckpointError(f"tensor {name!r} appears in both {seen[name]} and {path}")
            seen[name] = path
            yield name, path, spec, base


def read_tensor(path: Path, spec: dict, base: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor from disk; if ``out`` is given (same shape), fill it, converting the
    dtype.
    """
    try:
        dtype = SAFE_DTYPES[spec["dtype"]]
        shape = tuple(spec["shape"])
        start, end = spec["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed tensor entry {spec!r}") from e
    if out is not None and tuple(out.shape) != shape:
        raise CheckpointError(
            f"{path}: shape {shape} does not match the expected {tuple(out.shape)}"
        )
    direct = (
        out is not None and out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
    )
    buf = out if direct else torch.empty(shape, dtype=dtype)
    nbytes = end - start
    if buf.numel() * buf.element_size() != nbytes:
        raise CheckpointError(f"{path}: tensor byte size does not match its shape {shape}")
    with open(path, "rb") as f:
        f.seek(base + start)
        view = memoryview(buf.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        got = f.readinto(view) if nbytes else 0
    if got != nbytes:
        raise CheckpointError(f"{path}: truncated file (expected {nbytes} bytes, got {got})")
    if out is not None and not direct:
        out.copy_(buf)
        return out
    return buf


def read_slice(
    path: Path, spec: dict, base: int, out: torch.Tensor, dim: int, start: int
) -> torch.Tensor:
    """Fill ``out`` with the slice ``[start, start + out.shape[dim])`` along ``dim`` of a stored
    tensor, reading only those bytes (a tensor-parallel rank's share: rows are one read, columns
    one read per row)."""
    try:
        dtype = SAFE_DTYPES[spec["dtype"]]
        shape = tuple(spec["shape"])
        first = spec["data_offsets"][0]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed tensor entry {spec!r}") from e
    n = out.shape[dim] if out.dim() else 0
    want = shape[:dim] + (n,) + shape[dim + 1 :] if dim < len(shape) else None
    if want != tuple(out.shape) or start + n > shape[dim]:
        raise CheckpointError(
            f"{path}: cannot read rows/columns {start}:{start + n} along dim {dim} of a tensor of "
            f"shape {shape} into {tuple(out.shape)}"
        )
    outer = math.prod(shape[:dim])
    inner = math.prod(shape[dim + 1 :]) * dtype.itemsize
    buf = out if out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu" else None
    buf = torch.empty(tuple(out.shape), dtype=dtype) if buf is None else buf
    view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
    piece, stride = n * inner, shape[dim] * inner
    with open(path, "rb") as f:
        fd = f.fileno()
        for o in range(outer):
            offset = base + first + o * stride + start * inner
            got = os.preadv(fd, [view[o * piece : (o + 1) * piece]], offset)
            if got != piece:
                raise CheckpointError(
                    f"{path}: truncated file (expected {piece} bytes at {offset})"
                )
    if buf is not out:
        out.copy_(buf)
    return out


def load_into(
    params: dict[str, torch.Tensor],
    files: list[Path],
    rename: Callable[[str], str],
    optional: set[str] = frozenset(),
    ignored: set[str] = frozenset(),
    progress: Callable[[int, int], None] | None = None,
    on_loaded: Callable[[str], None] | None = None,
    slices: dict[str, tuple[int, int]] | None = None,
    ignored_prefixes: tuple[str, ...] = (),
) -> None:
    """Fill ``params`` (preallocated, by native name) from the files; strict about names and shapes.

    ``optional`` names may be absent from the files; ``ignored`` names (and names starting with
    ``ignored_prefixes``) may be present and are skipped. ``slices``: native name -> (dim,
    start) of tensors read in part (:func:`read_slice`). ``on_loaded(native name)`` is called
    after each tensor is read.
    """
    slices = slices or {}
    specs = [
        s
        for s in iter_tensor_specs(files)
        if rename(s[0]) not in ignored and not rename(s[0]).startswith(ignored_prefixes)
    ]
    total = sum(s["data_offsets"][1] - s["data_offsets"][0] for _, _, s, _ in specs)
    done, loaded, unexpected = 0, set(), []
    for name, path, spec, base in specs:
        native = rename(name)
        if native not in params:
            unexpected.append(name)
            continue
        if native in slices:
            read_slice(path, spec, base, params[native], *slices[native])
        else:
            read_tensor(path, spec, base, out=params[native])
        loaded.add(native)
        if on_loaded is not None:
            on_loaded(native)
        done += spec["data_offsets"][1] - spec["data_offsets"][0]
        if progress is not None:
            progress(done, total)
    missing = sorted(set(params) - loaded - set(optional))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_names(unexpected)}")
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))


def _names(names: list[str], limit: int = 8) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
