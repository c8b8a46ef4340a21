"""Released AWQ and GPTQ checkpoints, loaded as they are on disk.

A checkpoint's ``quantization_config`` (config.json, top level or under ``text_config``) picks a
:class:`Quantized` weight format before the model is built
(:func:`format_for`); every decoder linear then reads its packed tensors (``qweight``,
``qzeros``, ``scales``, ``g_idx``, ``bias``) by their checkpoint names, and ``finish_loading``
unpacks them into integer weights ``q [out, in]`` with per-group ``scales`` and ``zeros``:
``w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]`` applied to ``x[..., perm]``.
Nothing is widened to a dense weight while loading.

The on-disk layouts (written from the formats' published definitions):

* AWQ "gemm" (AutoAWQ): ``qweight`` int32 ``[in, out / 8]``; each int32 packs 8 output columns
  as 4-bit nibbles in AWQ's interleaved order (nibble ``i``, bits ``4i..4i+3``, holds column
  ``[0, 2, 4, 6, 1, 3, 5, 7][i]`` of its block of 8). ``qzeros`` int32 ``[in / G, out / 8]`` in
  the same order, fp16 ``scales [in / G, out]``. Groups are contiguous runs of ``G`` inputs.
* GPTQ (auto-gptq): ``qweight`` int32 ``[in * bits / 32, out]`` packed along the *input*
  (int32 row ``r`` holds inputs ``r * 32/bits + j`` at bits ``j * bits``), ``qzeros`` int32
  ``[groups, out * bits / 32]`` packed the same way along the output, fp16 ``scales [groups,
  out]``, int32 ``g_idx [in]``: the group of each input. ``checkpoint_format`` "gptq" stores
  each zero point minus one, "gptq_v2" the zero point itself. With ``desc_act`` (act-order)
  ``g_idx`` is not sorted: the inputs are sorted by it (a stable argsort, ``perm``) so each group
  is contiguous again, and the layer multiplies ``x[..., perm]``. The q/k/v (and gate/up) parts
  of a fused layer share their input, so they must share that order.

4-bit layers become :class:`~qwenvl.layers.int4_linear.Int4Linear` and 8-bit ones
``Int8GroupLinear`` (the CPU kernels' block layouts, decoded in the fused step) where the kernels
take the group size, else the torch :class:`GroupQuantLinear` here (dequantise per call). The
vision tower and the LM head are not quantised in the releases and stay dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl.errors import CheckpointError, ConfigError
from qwenvl.layers.int4_linear import Int4Linear, Int8GroupLinear
from qwenvl.models.interface import WeightFormat

# AWQ packs column c of each block of 8 into nibble _AWQ_NIBBLE[c] (the inverse of the pack
# order [0, 2, 4, 6, 1, 3, 5, 7]).
_AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)

# quant_method values of formats we refuse, with the name users know them by
_OTHER_METHODS = {
    "bitsandbytes": "bitsandbytes",
    "exl2": "ExLlamaV2 (exl2)",
    "fp8": "FP8",
    "fbgemm_fp8": "FBGEMM FP8",
    "compressed-tensors": "compressed-tensors",
    "compressed_tensors": "compressed-tensors",
    "gguf": "GGUF",
    "hqq": "HQQ",
    "aqlm": "AQLM",
    "quanto": "quanto",
    "eetq": "EETQ",
    "torchao": "torchao",
    "marlin": "Marlin",
    "bitnet": "BitNet",
    "vptq": "VPTQ",
    "higgs": "HIGGS",
    "mxfp4": "MXFP4",
}
_NAME = re.compile(r"^(awq|gptq|gptq_v2):w(\d+)g(-1|\d+)$")


@dataclass(frozen=True)
class Quantized(WeightFormat):
    """A released AWQ or GPTQ checkpoint's packed integer weights, read as they are on disk and
    unpacked at load (below); chosen by the checkpoint's
    ``quantization_config``. The vision tower stays dense; the LM head keeps the checkpoint's
    16-bit values (fp16 in the releases) in a ``PackedLinear`` "16bit" layer, which the CPU
    GEMV reads at 2 bytes a weight instead of a float32 copy's 4.

    Args:
        method: ``awq`` (gemm), ``gptq`` (zero points stored minus one) or ``gptq_v2``.
        bits: 4 (AWQ, GPTQ) or 8 (GPTQ).
        group_size: inputs per scale/zero group; -1: one group over the whole input.
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128

    def head(self, in_features: int, out_features: int) -> nn.Module | None:
        from qwenvl.layers.packed_linear import PackedLinear

        return PackedLinear(in_features, out_features, False, "16bit")

    def linear(
        self, in_features: int, out_features: int, bias: bool, parts: dict[str, int] | None = None
    ) -> nn.Module:
        return quantized_linear(self, in_features, out_features, bias, parts)


def quantization_config_of(config: dict[str, Any]) -> dict[str, Any] | None:
    """A config.json's ``quantization_config`` (top level, or under ``text_config``), or None."""
    q = config.get("quantization_config")
    text = config.get("text_config")
    if q is None and isinstance(text, dict):
        q = text.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"quantization_config must be a JSON object, got {type(q).__name__}")
    return q


def _int(q: dict[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        if key in q:
            value = q[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"quantization_config.{key} must be an integer, got {value!r}")
            return value
    if default is None:
        raise ConfigError(f"quantization_config has no {keys[0]}")
    return default


def format_for(q: dict[str, Any]) -> Quantized:
    """The weight format of a ``quantization_config``; a ConfigError naming anything else."""
    method = q.get("quant_method")
    if not isinstance(method, str):
        raise ConfigError(f"quantization_config has no quant_method (got {method!r})")
    method = method.lower()
    supported = "qwenvl loads AWQ (4-bit gemm) and GPTQ (4- and 8-bit) checkpoints"
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(f"AWQ version {version!r} is not supported; {supported}")
        bits = _int(q, "bits", "w_bit", default=4)
        if bits != 4:
            raise ConfigError(f"AWQ with {bits}-bit weights is not supported; {supported}")
        if not q.get("zero_point", True):
            raise ConfigError(f"AWQ without zero points is not supported; {supported}")
        group = _int(q, "group_size", "q_group_size", default=128)
        name = "awq"
    elif method == "gptq":
        bits = _int(q, "bits", default=4)
        if bits not in (4, 8):
            raise ConfigError(f"GPTQ with {bits}-bit weights is not supported; {supported}")
        if q.get("lm_head"):
            raise ConfigError("GPTQ with a quantised lm_head is not supported (the head is dense)")
        layout = str(q.get("checkpoint_format") or q.get("format") or "gptq").lower()
        if layout not in ("gptq", "gptq_v2"):
            raise ConfigError(f"GPTQ checkpoint_format {layout!r} is not supported; {supported}")
        group = _int(q, "group_size", default=128)
        name = layout
    else:
        known = _OTHER_METHODS.get(method, method)
        raise ConfigError(f"quantization method {known!r} is not supported; {supported}")
    if group != -1 and group <= 0:
        raise ConfigError(f"quantization_config.group_size must be positive or -1, got {group}")
    return Quantized(f"{name}:w{bits}g{group}", method=name, bits=bits, group_size=group)


def format_named(name: str) -> Quantized | None:
    """The format a name from :func:`format_for` stands for (``"gptq:w4g128"``), else None."""
    m = _NAME.match(name)
    if m is None:
        return None
    method, bits, group = m.group(1), int(m.group(2)), int(m.group(3))
    return Quantized(name, method=method, bits=bits, group_size=group)


# ----------------------------------------------------------------------------- unpacking


def _nibbles(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., n]`` int32 -> ``[..., n, 32 / bits]`` unsigned values, lowest bits first."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    return (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ gemm tensors -> ``q`` uint8 ``[out, in]``, ``scales`` and ``zeros`` float32
    ``[out, in / G]``."""
    order = torch.tensor(_AWQ_NIBBLE, device=qweight.device)

    def columns(packed: torch.Tensor) -> torch.Tensor:  # [rows, out/8] -> [rows, out]
        return _nibbles(packed, 4)[..., order].flatten(-2)

    q = columns(qweight).t().to(torch.uint8).contiguous()
    zeros = columns(qzeros).t().float().contiguous()
    return q, scales.t().float().contiguous(), zeros


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    group_size: int,
    zero_offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """auto-gptq tensors -> ``q`` uint8 ``[out, in]`` (inputs in ``perm`` order), ``scales``
    and ``zeros`` float32 ``[out, in / G]``, and ``perm`` (None when ``g_idx`` is sorted).
    ``zero_offset``: 1 for "gptq" (zeros stored minus one), 0 for "gptq_v2"."""
    q = _nibbles(qweight, bits).transpose(1, 2).flatten(0, 1)  # [in, out]
    zeros = _nibbles(qzeros, bits).flatten(-2) + zero_offset  # [groups, out]
    n_in = q.shape[0]
    g = g_idx.to(torch.long)
    expected = torch.arange(n_in, device=g.device) // group_size
    perm = None
    if not torch.equal(g, expected):
        perm = torch.sort(g, stable=True).indices
        if not torch.equal(g[perm], expected):
            raise CheckpointError(
                f"g_idx does not split the {n_in} inputs into groups of {group_size}; "
                "this GPTQ layout is not supported"
            )
        q = q[perm]
    return q.t().to(torch.uint8).contiguous(), scales.t().float(), zeros.t().float(), perm


# ----------------------------------------------------------------------------- modules


class GroupQuantLinear(nn.Module):
    """``y = x[..., perm] @ W^T + b`` with ``W`` kept as integers and per-group scales/zeros,
    dequantised per call (a torch path for group sizes the kernels' layouts do not take).
    Same constructor and ``load_quantized`` as ``Int4Linear``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int = 128,
        parts: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.parts = group_size, parts
        groups = in_features // group_size
        self.register_buffer("q", torch.empty(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, groups))
        self.register_buffer("zeros", torch.empty(out_features, groups))
        self.register_buffer("bias", torch.empty(out_features) if bias else None)
        self.register_buffer("perm", None)

    def load_quantized(
        self,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
    ) -> None:
        self.q, self.scales, self.zeros = q.to(torch.uint8), scales.float(), zeros.float()
        self.bias = None if bias is None else bias.float()
        self.perm = None if perm is None else perm.long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x[..., self.perm]
        g = self.group_size
        w = self.q.to(x.dtype).view(self.out_features, -1, g)
        w = (w - self.zeros.to(x.dtype)[..., None]) * self.scales.to(x.dtype)[..., None]
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.view(self.out_features, self.in_features), bias)


class _FromCheckpoint:
    """Loading a released AWQ/GPTQ checkpoint's packed tensors into an integer linear layer
    (mixed into ``Int4Linear`` or :class:`GroupQuantLinear`)."""

    fmt: Quantized
    parts: dict[str, int] | None
    in_features: int
    out_features: int
    group_size: int
    _ckpt: dict[str, dict[str, torch.Tensor]] | None
    _has_bias: bool
    _first_group: int = (
        0  # tensor parallel, split by input columns: the first group this rank reads
    )

    def shard_slice(self, tensor: str, kind: str, start: int) -> tuple[int, int] | None:
        """(dim, start) of a tensor-parallel rank's share of a packed tensor (None: read whole).
        Output rows are cut where the integers pack them (``32 / bits`` to an int32: AWQ's
        qweight, both methods' qzeros), input columns in whole groups."""
        per, g, awq = 32 // self.fmt.bits, self.group_size, self.fmt.method == "awq"
        if kind == "out":
            packed = tensor == "qzeros" or (awq and tensor == "qweight")
            if packed and start % per:
                raise ConfigError(f"a rank's output rows must start at a multiple of {per}")
            return (
                None
                if tensor == "g_idx"
                else (1 if tensor != "bias" else 0, start // (per if packed else 1))
            )
        if start % g or self.in_features % g:
            raise ConfigError(
                f"tensor parallelism splits this layer's inputs at {start}, not a multiple of the "
                f"checkpoint's group size {g}"
            )
        if tensor == "bias":
            raise ConfigError("a row-parallel layer with a bias is not supported")
        if tensor == "g_idx":
            self._first_group = start // g
            return 0, start
        if tensor == "qweight":
            return 0, start if awq else start // per
        return 0, start // g  # qzeros, scales

    def allocate(self, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The packed tensors the loader reads, by checkpoint name (relative to this module, or
        to its parent for a fused layer: ``q_proj.qweight``...). Scales and bias are read into
        float32, which holds fp16 and bf16 values exactly whatever the config's dtype says (a
        bf16-labelled GPTQ file's fp16 scales would otherwise be rounded to bf16)."""
        fmt, n_in, g = self.fmt, self.in_features, self.group_size
        per = 32 // fmt.bits
        parts = self.parts or {"": self.out_features}
        self._ckpt, targets = {}, {}
        for name, rows in parts.items():
            if fmt.method == "awq":
                shapes = {"qweight": (n_in, rows // per), "qzeros": (n_in // g, rows // per)}
            else:
                shapes = {"qweight": (n_in // per, rows), "qzeros": (n_in // g, rows // per)}
            tensors = {
                k: torch.empty(s, dtype=torch.int32, device=device) for k, s in shapes.items()
            }
            tensors["scales"] = torch.empty(n_in // g, rows, dtype=torch.float32, device=device)
            if fmt.method != "awq":
                tensors["g_idx"] = torch.empty(n_in, dtype=torch.int32, device=device)
            if self._has_bias:
                tensors["bias"] = torch.empty(rows, dtype=torch.float32, device=device)
            self._ckpt[name] = tensors
            targets.update({f"{name}.{k}" if name else k: t for k, t in tensors.items()})
        return targets

    def finish_loading(self) -> None:
        """Unpack what the loader read into integers, scales and zeros (and the shared input
        order of an act-order checkpoint), and hand them to the layer."""
        assert self._ckpt is not None, "allocate() first"
        fmt, qs, ss, zs, bs = self.fmt, [], [], [], []
        perm, perm_of = None, None
        for name, t in self._ckpt.items():
            if fmt.method == "awq":
                q, s, z = unpack_awq(t["qweight"], t["qzeros"], t["scales"])
                p = None
            else:
                offset = 1 if fmt.method == "gptq" else 0
                g_idx = t["g_idx"] - self._first_group
                if (
                    self._first_group
                    and not ((g_idx >= 0) & (g_idx < len(g_idx) // self.group_size)).all()
                ):
                    raise ConfigError(
                        "this act-order GPTQ checkpoint (desc_act) mixes groups across the input "
                        "columns that tensor parallelism splits; run it at tensor_parallel_size=1"
                    )
                q, s, z, p = unpack_gptq(
                    t["qweight"],
                    t["qzeros"],
                    t["scales"],
                    g_idx,
                    fmt.bits,
                    self.group_size,
                    offset,
                )
            if qs and not _same_perm(perm, p):
                raise CheckpointError(
                    f"act-order (g_idx) differs between {perm_of} and {name}, which share their "
                    "input in one fused layer; this GPTQ checkpoint is not supported"
                )
            perm, perm_of = p, name
            qs.append(q), ss.append(s), zs.append(z)
            if "bias" in t:
                bs.append(t["bias"])
        self._ckpt = None
        bias = torch.cat(bs).float() if bs else None
        self.load_quantized(torch.cat(qs), torch.cat(ss), torch.cat(zs), bias=bias, perm=perm)


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def _kernel_class(in_features: int, group: int, bits: int) -> type[nn.Module]:
    """``Int4Linear`` (4-bit) or ``Int8GroupLinear`` (8-bit) where the kernels' layout takes the
    group size, else the torch path, which computes the same product."""
    cls = Int4Linear if bits == 4 else Int8GroupLinear
    try:
        cls._packed_shape(8, in_features, group)
    except ValueError:
        return GroupQuantLinear
    return cls


# A checkpoint's linear on each kernel class: module-level classes, so a built model pickles
# (``qwenvl.weight_cache``).
class QuantizedInt4Linear(_FromCheckpoint, Int4Linear):
    pass


class QuantizedInt8GroupLinear(_FromCheckpoint, Int8GroupLinear):
    pass


class QuantizedGroupQuantLinear(_FromCheckpoint, GroupQuantLinear):
    pass


_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    Int4Linear: QuantizedInt4Linear,
    Int8GroupLinear: QuantizedInt8GroupLinear,
    GroupQuantLinear: QuantizedGroupQuantLinear,
}


def quantized_linear(
    fmt: Quantized,
    in_features: int,
    out_features: int,
    bias: bool,
    parts: dict[str, int] | None = None,
) -> nn.Module:
    """A decoder linear of ``fmt`` (``parts``: the checkpoint linears of a fused layer)."""
    # -1, or a group wider than the layer: one group over the whole input (as auto-gptq's g_idx)
    group = fmt.group_size if 0 < fmt.group_size < in_features else in_features
    per = 32 // fmt.bits
    rows = list((parts or {"": out_features}).values())
    if in_features % group or any(r % per for r in rows) or in_features % per:
        raise ConfigError(
            f"{fmt.name}: a linear layer {in_features} -> {out_features} (parts {rows}) does not "
            f"divide into groups of {group} and {per}-value int32 packs"
        )
    base = _kernel_class(in_features, group, fmt.bits)
    m = _CLASSES[base](in_features, out_features, bias, group_size=group, parts=parts)
    m.fmt, m.parts, m.group_size = fmt, parts, group
    m._ckpt, m._has_bias = None, bias
    return m
