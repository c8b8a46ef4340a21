"""Writing AWQ and GPTQ checkpoints: the inverse of :mod:`qwenvl.models.quantized`'s unpackers.

:func:`quantize_checkpoint` reads a 16-bit checkpoint tensor by tensor, quantises the language
model's decoder linears (``q/k/v/o/gate/up/down_proj``) by round-to-nearest in groups of
``group_size`` inputs, and writes them in the released on-disk layouts, so that our reader,
transformers and vLLM load the result like the Qwen2-VL AWQ / GPTQ releases:

* ``int4``: asymmetric with integer zero points. Per group (one output row, ``G`` inputs) the
  range is widened to hold 0, ``lo = min(w, 0)``, ``hi = max(w, 0)`` (as GPTQ's quantizer
  does, so a group of positive weights keeps its top), ``scale = fp16((hi - lo) / 15)``, ``zero
  = clamp(round(-lo / scale), zmin, 15)``, ``q = clamp(round(w / scale) + zero, 0, 15)``.
  GPTQ stores ``zero - 1`` (auto-gptq's "gptq" layout, the one vLLM reads), which cannot hold 0,
  so there ``zmin = 1``; AWQ stores the zero itself (``zmin = 0``).
* ``int8``: GPTQ 8-bit symmetric, ``scale = fp16(max|w| / 127)``, ``zero = 128``.

Arithmetic is float32 throughout (IEEE-exact division and half-to-even rounding), so an
independent implementation of the same definition gives the same integers bit for bit. Everything
else (the vision tower, embeddings, norms, the LM head, the linears' biases) is copied byte for
byte in its own dtype, under the released (transformers 4.x) tensor names.

Memory: the source is never loaded whole. Output shards are planned from the safetensors headers
alone (the packed shapes follow from the 16-bit ones), each shard's header is written first, and
then one source tensor at a time is read, quantised and appended (copied tensors stream in
chunks), so the peak is about one decoder linear plus its float32 working set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from qwenvl.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

SHARD_BYTES = 4 << 30  # the most bytes one output file holds (one bigger tensor gets its own)
INDEX_FILE = "model.safetensors.index.json"
METHODS = ("int4", "int8")
LAYOUTS = ("gptq", "awq")

# The decoder linears we quantise, by our (released) name; nothing of ``visual.*`` or the head.
DECODER_LINEAR = re.compile(
    r"^model\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight$"
)
# AWQ's nibble i (bits 4i..4i+3) of each int32 holds column AWQ_PACK_ORDER[i] of its block of 8
# (the inverse of the reader's _AWQ_NIBBLE).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# A group whose range rounds to a zero fp16 scale (all zeros, or below fp16's reach) takes the
# smallest positive fp16, so nothing divides by zero and its values still round to the zero.
FP16_TINY = 2.0**-24
SAFE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_NOT_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_COPY_CHUNK = 64 << 20


# ----------------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class ExportSpec:
    """What ``qwenvl quantize`` writes.

    Args:
        method: ``int4`` (asymmetric, integer zero points) or ``int8`` (symmetric, zero 128).
        layout: ``gptq`` (auto-gptq's, zeros stored minus one) or ``awq`` (AutoAWQ gemm; 4-bit).
        group_size: inputs per scale; -1 = one group over the whole input (GPTQ only).
    """

    method: str = "int4"
    layout: str = "gptq"
    group_size: int = 128

    @property
    def bits(self) -> int:
        return 4 if self.method == "int4" else 8

    @property
    def symmetric(self) -> bool:
        return self.method == "int8"

    @property
    def min_zero(self) -> int:
        """The smallest zero point the layout stores: GPTQ's ``zero - 1`` must not go below 0."""
        return 1 if self.layout == "gptq" else 0

    def check(self) -> None:
        """A ConfigError for a combination the released formats do not have."""
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; use one of {list(METHODS)}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}; use one of {list(LAYOUTS)}")
        if self.layout == "awq" and self.method != "int4":
            raise ConfigError("the AWQ layout is 4-bit only; use --layout gptq for int8")
        if self.group_size == 0 or self.group_size < -1:
            raise ConfigError(f"group size must be positive or -1, got {self.group_size}")
        if self.layout == "awq" and self.group_size == -1:
            raise ConfigError("the AWQ layout needs a positive group size (e.g. 128)")

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def quantization_config(self) -> dict[str, Any]:
        """config.json's ``quantization_config``, as the Qwen2-VL AWQ / GPTQ releases carry it.

        AWQ's ``modules_to_not_convert`` adds ``model.visual`` to the releases' ``visual``:
        AutoAWQ, vLLM and transformers 4 match these as substrings, but transformers 5 matches
        them from the start of its module names (``model.visual.*``), where ``visual`` alone
        lets it turn the vision tower into AWQ layers and fail on their missing tensors."""
        if self.layout == "awq":
            return {
                "quant_method": "awq",
                "bits": 4,
                "group_size": self.group_size,
                "version": "gemm",
                "zero_point": True,
                "modules_to_not_convert": ["visual", "model.visual"],
            }
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": False,
            "sym": self.symmetric,
            "lm_head": False,
            "checkpoint_format": "gptq",
        }


# ----------------------------------------------------------------------------- quantising


@dataclass
class GroupQuant:
    """A weight ``[out, in]`` as integers: ``w ~= (q - zeros) * scales`` per group of inputs.

    ``q`` uint8 ``[out, in]``, ``scales`` fp16 ``[out, in / G]``, ``zeros`` uint8 ``[out, in /
    G]``: the orientation of the reader's ``unpack_*`` results, so packing is their inverse.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


def round_to_nearest(
    w: torch.Tensor, group: int, bits: int, symmetric: bool, min_zero: int = 0
) -> GroupQuant:
    """Round-to-nearest group quantisation of ``w [out, in]`` (the module docstring's
    definition), 16 MB of float32 rows at a time: a large layer never widens whole."""
    n_out, n_in = w.shape
    q = torch.empty(n_out, n_in, dtype=torch.uint8)
    scales = torch.empty(n_out, n_in // group, dtype=torch.float16)
    zeros = torch.empty(n_out, n_in // group, dtype=torch.uint8)
    rows = max(1, (1 << 22) // n_in)
    for r in range(0, n_out, rows):
        x = w[r : r + rows].float().unflatten(-1, (-1, group))
        part = _rtn_groups(x, bits, symmetric, min_zero)
        q[r : r + rows] = part.q.flatten(-2)
        scales[r : r + rows], zeros[r : r + rows] = part.scales, part.zeros
    return GroupQuant(q, scales, zeros)


def _rtn_groups(x: torch.Tensor, bits: int, symmetric: bool, min_zero: int) -> GroupQuant:
    """``x [rows, groups, G]`` float32 -> integers, fp16 scales and zeros ``[rows, groups]``."""
    maxq = (1 << bits) - 1
    if symmetric:
        scale = x.abs().amax(-1) / float((1 << (bits - 1)) - 1)
    else:
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        scale = (hi - lo) / float(maxq)
    scale16 = scale.half()
    if not torch.isfinite(scale16).all():
        raise CheckpointError("weights that are not finite or too large for fp16 scales")
    scale16 = torch.where(scale16 > 0, scale16, torch.tensor(FP16_TINY, dtype=torch.float16))
    s = scale16.float()
    if symmetric:
        zero = torch.full_like(s, float(1 << (bits - 1)))
    else:
        zero = torch.round(-lo / s).clamp(min_zero, maxq)
    q = (torch.round(x / s[..., None]) + zero[..., None]).clamp(0, maxq)
    return GroupQuant(q.to(torch.uint8), scale16, zero.to(torch.uint8))


# ----------------------------------------------------------------------------- packing


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, n]`` unsigned ``bits``-wide values -> int32 ``[rows, n * bits / 32]``: value
    ``j`` of each run of ``32 / bits`` in bits ``j * bits`` (lowest first), the order both
    auto-gptq's ``qweight`` (along the input) and ``qzeros`` (along the output) use."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    out = torch.empty(values.shape[0], values.shape[1] // per, dtype=torch.int32)
    rows = max(1, (1 << 22) // max(1, values.shape[1]))
    for r in range(0, values.shape[0], rows):
        v = values[r : r + rows].to(torch.int64).unflatten(-1, (-1, per))
        words = (v << shifts).sum(-1)  # disjoint bit fields: the sum is their OR
        out[r : r + rows] = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return out


def pack_gptq(g: GroupQuant, bits: int, group: int) -> dict[str, torch.Tensor]:
    """auto-gptq's tensors (``checkpoint_format`` "gptq"): ``qweight [in * bits / 32, out]``
    packed along the input, ``qzeros [groups, out * bits / 32]`` holding ``zero - 1``, fp16
    ``scales [groups, out]`` and ``g_idx [in]`` (sorted: no act-order)."""
    if int(g.zeros.min()) < 1:
        raise ValueError("GPTQ's 'gptq' layout stores zero - 1: zero points must be >= 1")
    n_in = g.q.shape[1]
    return {
        "qweight": pack_int32(g.q, bits).t().contiguous(),
        "qzeros": pack_int32((g.zeros - 1).t().contiguous(), bits),
        "scales": g.scales.t().contiguous(),
        "g_idx": (torch.arange(n_in, dtype=torch.int32) // group).to(torch.int32),
    }


def pack_awq(g: GroupQuant) -> dict[str, torch.Tensor]:
    """AutoAWQ gemm's tensors: ``qweight [in, out / 8]`` and ``qzeros [groups, out / 8]`` in
    AWQ's interleaved nibble order, fp16 ``scales [groups, out]``."""

    def interleaved(values: torch.Tensor) -> torch.Tensor:  # [out, rows] -> [rows, out / 8]
        t = values.t().contiguous()
        blocks = t.unflatten(-1, (-1, 8))[..., list(AWQ_PACK_ORDER)]
        return pack_int32(blocks.flatten(-2), 4)

    return {
        "qweight": interleaved(g.q),
        "qzeros": interleaved(g.zeros),
        "scales": g.scales.t().contiguous(),
    }


def packed_shapes(spec: ExportSpec, n_out: int, n_in: int) -> dict[str, tuple[torch.dtype, tuple]]:
    """The packed tensors of one ``[n_out, n_in]`` linear (dtype, shape), known before any
    weight is read: what lets a shard's header be written first."""
    groups, per = n_in // spec.group_for(n_in), 32 // spec.bits
    if spec.layout == "awq":
        return {
            "qweight": (torch.int32, (n_in, n_out // per)),
            "qzeros": (torch.int32, (groups, n_out // per)),
            "scales": (torch.float16, (groups, n_out)),
        }
    return {
        "qweight": (torch.int32, (n_in // per, n_out)),
        "qzeros": (torch.int32, (groups, n_out // per)),
        "scales": (torch.float16, (groups, n_out)),
        "g_idx": (torch.int32, (n_in,)),
    }


def quantize_linear(w: torch.Tensor, spec: ExportSpec) -> dict[str, torch.Tensor]:
    """One decoder linear's weight ``[out, in]`` -> its packed tensors (names without prefix)."""
    group = spec.group_for(w.shape[1])
    g = round_to_nearest(w, group, spec.bits, spec.symmetric, spec.min_zero)
    return pack_awq(g) if spec.layout == "awq" else pack_gptq(g, spec.bits, group)


# ----------------------------------------------------------------------------- planning


@dataclass
class _Item:
    """One source tensor and what it becomes: a byte copy, or a decoder linear's packed tensors."""

    source: str  # name in the source file
    path: Path
    spec: dict  # the source header entry
    base: int  # where the source file's data starts
    outputs: dict[str, tuple[torch.dtype, tuple]] = field(default_factory=dict)  # name -> layout
    quantize: bool = False

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for d, s in self.outputs.values())


def _plan(
    specs: Iterator[tuple[str, Path, dict, int]], rename: Callable[[str], str], spec: ExportSpec
) -> list[_Item]:
    """Each source tensor's fate, checked before anything is written."""
    from qwenvl.weights import SAFE_DTYPES

    items = []
    for name, path, entry, base in specs:
        native = rename(name)
        dtype, shape = SAFE_DTYPES.get(entry.get("dtype")), tuple(entry.get("shape", ()))
        if dtype is None:
            raise CheckpointError(f"{name}: unsupported dtype {entry.get('dtype')!r} in {path}")
        item = _Item(name, path, entry, base)
        if DECODER_LINEAR.match(native):
            _check_linear(native, dtype, shape, spec)
            prefix = native.removesuffix("weight")
            item.quantize = True
            item.outputs = {prefix + k: v for k, v in packed_shapes(spec, *shape).items()}
        else:
            item.outputs = {native: (dtype, shape)}
        items.append(item)
    if not any(i.quantize for i in items):
        raise CheckpointError("found no decoder linear weights (model.layers.N.*_proj.weight)")
    return items


def _check_linear(name: str, dtype: torch.dtype, shape: tuple, spec: ExportSpec) -> None:
    if not dtype.is_floating_point or len(shape) != 2:
        raise CheckpointError(f"{name}: expected a 2-D floating weight, got {dtype} {shape}")
    n_out, n_in = shape
    group, per = spec.group_for(n_in), 32 // spec.bits
    if n_in % group:
        raise ConfigError(
            f"group size {group} does not divide the input width {n_in} of {name}; "
            "pick a divisor (or -1 for one group per output channel)"
        )
    if n_in % per or n_out % per or (spec.layout == "awq" and n_out % 8):
        raise ConfigError(f"{name} {n_out}x{n_in} does not split into {per}-value int32 packs")


def _shards(items: list[_Item], limit: int) -> list[list[_Item]]:
    """Consecutive items in files of at most ``limit`` bytes (a bigger item alone in its own)."""
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


# ----------------------------------------------------------------------------- writing


def _header(items: list[_Item]) -> bytes:
    """A safetensors header for the items' outputs in order (8-byte aligned, as the format asks)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in items:
        for name, (dtype, shape) in item.outputs.items():
            n = math.prod(shape) * dtype.itemsize
            entry = {"dtype": SAFE_NAMES[dtype], "shape": list(shape)}
            header[name] = {**entry, "data_offsets": [offset, offset + n]}
            offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f: BinaryIO, t: torch.Tensor) -> None:
    t = t.contiguous()
    if t.numel():
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _copy_bytes(item: _Item, f: BinaryIO) -> None:
    """A tensor kept as it is: its bytes, in chunks, never decoded."""
    start, end = item.spec["data_offsets"]
    with open(item.path, "rb") as src:
        src.seek(item.base + start)
        left = end - start
        while left:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise CheckpointError(f"{item.path}: truncated file (tensor {item.source})")
            f.write(chunk)
            left -= len(chunk)


def _write_item(item: _Item, spec: ExportSpec, f: BinaryIO) -> None:
    if not item.quantize:
        _copy_bytes(item, f)
        return
    from qwenvl.weights import read_tensor

    w = read_tensor(item.path, item.spec, item.base)
    try:
        packed = quantize_linear(w, spec)
    except CheckpointError as e:
        raise CheckpointError(f"{item.source}: {e}") from None
    prefix = next(iter(item.outputs)).rsplit(".", 1)[0] + "."
    for name, (dtype, shape) in item.outputs.items():
        t = packed[name.removeprefix(prefix)]
        assert t.dtype == dtype and tuple(t.shape) == shape, (name, t.dtype, t.shape)
        _write_tensor(f, t)


def _write_shard(path: Path, items: list[_Item], spec: ExportSpec) -> None:
    with open(path, "wb") as f:
        f.write(_header(items))
        for item in items:
            _write_item(item, spec, f)


def _write_weights(
    items: list[_Item], spec: ExportSpec, folder: Path, limit: int, progress: Callable | None
) -> int:
    """The shards and, for more than one, the index; returns the bytes of tensor data."""
    shards = _shards(items, limit)
    total = sum(i.nbytes for i in items)
    n = len(shards)
    names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    if n == 1:
        names = ["model.safetensors"]
    weight_map, done = {}, 0
    for name, shard in zip(names, shards):
        _write_shard(folder / name, shard, spec)
        done += sum(i.nbytes for i in shard)
        logger.info("wrote %s (%d tensors)", name, sum(len(i.outputs) for i in shard))
        if progress is not None:
            progress(done, total)
        weight_map.update({n: name for i in shard for n in i.outputs})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return total


def _write_config(config: dict[str, Any], spec: ExportSpec, folder: Path) -> None:
    """config.json with the ``quantization_config``; its dtype says float16, the dtype the AWQ /
    GPTQ kernels compute in and the releases declare (16-bit tensors keep their own dtype)."""
    config = dict(config, quantization_config=spec.quantization_config())
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    config.update(dict.fromkeys(keys, "float16"))
    text = config.get("text_config")
    if isinstance(text, dict) and "dtype" in text:
        config["text_config"] = dict(text, dtype="float16")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _copy_other_files(source: Path, folder: Path) -> None:
    """Tokenizer, chat template, preprocessor, generation config...: every file but the weights
    and config.json (rewritten)."""
    for f in sorted(source.iterdir()):
        if (
            not f.is_file()
            or f.name in ("config.json", INDEX_FILE)
            or f.name.endswith(_NOT_WEIGHTS)
        ):
            continue
        shutil.copy2(f, folder / f.name)


# ----------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class ExportResult:
    """What :func:`quantize_checkpoint` wrote."""

    folder: Path
    linears: int  # decoder linears quantised
    copied: int  # tensors kept as they were
    weight_bytes: int
    files: int


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"output {out} exists and is not an empty folder; pick a new one")


def quantize_checkpoint(
    source: str | Path,
    output: str | Path,
    spec: ExportSpec,
    *,
    max_shard_bytes: int = SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Quantise a 16-bit checkpoint (folder or Hub id) into ``output`` in ``spec``'s layout.

    The folder is written under a temporary name beside ``output`` and renamed into place when
    complete, so a failure leaves no half-written checkpoint. Raises ConfigError /
    CheckpointError (never a bare traceback) for bad input: an already quantised model, an
    output folder in use, a group size that does not divide a layer.
    """
    from qwenvl.checkpoint import read_json, resolve_checkpoint
    from qwenvl.models import family_of, parse_config
    from qwenvl.models.quantized import format_for, quantization_config_of
    from qwenvl.weights import iter_tensor_specs, weight_files

    spec.check()
    out = Path(output).expanduser()
    _check_output(out)
    src = resolve_checkpoint(source)
    config = read_json(src / "config.json")
    quant = quantization_config_of(config)
    if quant is not None:
        try:
            name = format_for(quant).name
        except ConfigError:
            name = str(quant.get("quant_method"))
        raise ConfigError(f"{src} is already quantised ({name}); quantize a 16-bit checkpoint")
    family = family_of(parse_config(config, str(src / "config.json")))
    items = _plan(iter_tensor_specs(weight_files(src)), family.weights.from_hf, spec)
    tmp = out.parent / f".{out.name}.qwenvl-tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        total = _write_weights(items, spec, tmp, max_shard_bytes, progress)
        _write_config(config, spec, tmp)
        _copy_other_files(src, tmp)
        _check_output(out)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"quantizing into {out} failed: {e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = len(list(out.glob("*.safetensors")))
    linears = sum(i.quantize for i in items)
    return ExportResult(out, linears, len(items) - linears, total, files)
