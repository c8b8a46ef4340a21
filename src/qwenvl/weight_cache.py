"""The on-disk cache of built weights: a second start maps the packed model instead of repacking.

Packing a 16-bit checkpoint for the CPU kernels (bf16 rows in huge pages, q/k/v and gate/up
fused, the vision tower widened to float32) or quantising it to int8/int4 at load costs seconds
to minutes at every start, while llama.cpp maps a ready file. After the first such load, the
built model is written to ``<root>/<key>/model.pt`` and later loads map it
(``torch.load(mmap=True)``): its tensors are pages of that file, read when first touched.

``<root>`` is ``~/.cache/qwenvl/weights`` (``QWENVL_CACHE_DIR`` moves it;
``QWENVL_WEIGHT_CACHE=0`` turns the cache off). The key hashes everything the built model depends
on: the checkpoint's files (resolved path, size, modification time), the weight format, the
activation dtype, the kernels' ISA, torch's version and qwenvl's own model, layer and kernel
sources; a change to any of them gives a new folder. Each folder names its origin (checkpoint
folder, format, dtype, ISA) in ``origin.json``: writing a new folder deletes the older ones of the
same origin, which nothing can read again (a rebuilt checkpoint, an upgraded qwenvl or torch),
while other formats or checkpoints keep theirs; the size is logged when written, and the folders
are the user's to delete. A folder is written under a temporary name and renamed into place, so a
crash never leaves half a cache. The file is a pickle of qwenvl's own modules:
it is trusted as the compiled kernels in the same cache are, and read from nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qwenvl import kernels

logger = logging.getLogger(__name__)

_PACKAGE = Path(__file__).parent
_SOURCES = ("checkpoint.py", "weights.py", "models", "layers", "kernels")  # what builds a model
_FILE = "model.pt"
_ORIGIN = "origin.json"


def cache_root() -> Path:
    root = os.environ.get("QWENVL_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "qwenvl") / "weights"


def enabled() -> bool:
    return os.environ.get("QWENVL_WEIGHT_CACHE", "1") != "0"


def _source_digest() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        path = _PACKAGE / name
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.suffix in (".py", ".cpp", ".h"):
                h.update(str(f.relative_to(_PACKAGE)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _files_state(folder: Path, files: list[Path]) -> list[tuple[str, int, int]]:
    out = []
    for f in [folder / "config.json", *files]:
        st = f.stat()
        out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return out


@dataclass(frozen=True)
class WeightCache:
    """One built model's place in the cache."""

    folder: Path
    origin: dict[str, str]  # what it was built from, the key without the versions (origin.json)

    @property
    def path(self) -> Path:
        return self.folder / _FILE

    def load(self) -> nn.Module | None:
        """The cached model with its tensors mapped from the file, or None when there is none
        (or it cannot be read: then it is rebuilt and rewritten)."""
        if not self.path.is_file():
            return None
        try:
            model = torch.load(self.path, mmap=True, weights_only=False)
        except Exception as e:  # a truncated or foreign file: build again
            logger.warning("weight cache %s unreadable (%s); rebuilding it", self.folder, e)
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        logger.info("weights mapped from the cache %s (%.2f GiB)", self.folder, _gib(self.path))
        return model

    def store(self, model: nn.Module) -> None:
        """Write ``model`` under a temporary name, then rename it into place (never fails the
        load: a full disk only logs)."""
        tmp = self.folder.with_name(f".{self.folder.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.mkdir(parents=True)
            torch.save(model, tmp / _FILE)
            (tmp / _ORIGIN).write_text(json.dumps(self.origin))
            tmp.rename(self.folder)
        except Exception as e:  # a full disk, or a module that does not pickle
            shutil.rmtree(tmp, ignore_errors=True)
            if not self.path.is_file():  # another process may have won the rename
                logger.warning("could not write the weight cache %s: %s", self.folder, e)
            return
        self._prune()
        logger.info(
            "built weights cached in %s (%.2f GiB; later starts map them; delete the folder to "
            "reclaim the space, QWENVL_WEIGHT_CACHE=0 to turn this off)",
            self.folder,
            _gib(self.path),
        )

    def _prune(self) -> None:
        """Delete the other folders built from the same origin: stale keys no load will match
        again. A process still mapping one keeps its pages until it exits (Linux frees a deleted
        file's pages then)."""
        for other in self.folder.parent.iterdir():
            if other == self.folder or other.name.startswith("."):
                continue
            try:
                if json.loads((other / _ORIGIN).read_text()) != self.origin:
                    continue
                size = _gib(other / _FILE)
            except (OSError, ValueError):  # no origin (not ours, or older), or gone meanwhile
                continue
            shutil.rmtree(other, ignore_errors=True)
            logger.info("deleted the stale weight cache %s (%.2f GiB)", other, size)


def _gib(path: Path) -> float:
    return path.stat().st_size / 2**30


def weight_cache(
    folder: Path, files: list[Path], weight_format: str | None, dtype: torch.dtype, device: str
) -> WeightCache | None:
    """The cache entry of a load, or None where loads are not cached: dense weights (read as
    they are stored, nothing to save), devices other than the CPU, or caching turned off."""
    if weight_format is None or torch.device(device).type != "cpu" or not enabled():
        return None
    origin = {
        "checkpoint": str(folder.resolve()),
        "format": weight_format,
        "dtype": str(dtype),
        "isa": kernels.isa(),
    }
    key = {
        **origin,
        "files": _files_state(folder, files),
        "torch": torch.__version__,
        "sources": _source_digest(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = f"{folder.name}-{weight_format.replace(':', '_')}-{digest}"
    return WeightCache(cache_root() / name, origin)
