"""CPU kernels, built on first use: GEMV over bf16 and int8 weights, the small decode ops, and
the vision tower's bf16 attention.

A decode step multiplies a handful of rows by every weight matrix, so it is bound by how fast the
weights stream from memory; ``gemv.cpp`` reads each weight once for all (<= 16) rows and widens
bf16/int8 in registers. ``decode.cpp`` does the rest of a decoder layer's float32 work (RMSNorm,
the SwiGLU gate, rotary + paged-cache write + attention) in one call each, where eager torch
spends more time dispatching ops than computing; ``layers.cpp`` runs a packed decoder's layers
for a decode step in one call, threads forked once; ``attention.cpp`` is the attention of bf16
prefill (the ViT's, the decoder's prefills) in bf16 dot products, never storing the scores. The
extension is compiled with ``-march=native`` (``QWENVL_KERNELS_MARCH`` overrides it) on first
use; without a compiler (or with ``QWENVL_KERNELS=0``) ``available()`` is False and callers keep
using torch, and ``describe()`` says which of these holds.

The build cache: ``~/.cache/qwenvl/kernels/<key>/``, where the key hashes everything the library
depends on: the sources' bytes, the torch build, the Python ABI, the compiler, the flags and (for
``-march=native``) the CPU's features. It does not depend on where the sources or torch are
installed, so checkouts and environments with the same sources and toolchain share one build and
never rebuild when they alternate. A build copies the sources into a private temporary folder,
compiles there in a child process (``torch.utils.cpp_extension``) and renames the folder into
place, under a file lock, so concurrent first builds build once and a killed build leaves
nothing half-made behind; once built, the library is loaded directly, without the compiler or
ninja.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MAX_M",
    "applies",
    "available",
    "bf16_attention",
    "bf16_attention_applies",
    "decode_attention",
    "decode_layers",
    "dequantize_int4",
    "describe",
    "huge_page_copy",
    "linear_bf16",
    "linear_int4",
    "linear_int8",
    "pack_int4",
    "quantize_int4",
    "pack_int8_groups",
    "unpack_int8_groups",
    "int8_group_shape",
    "quantize_int8",
    "rms_norm",
    "silu_mul",
    "tile_int8",
    "unpack_int4",
    "untile_int8",
]

logger = logging.getLogger(__name__)

MAX_M = 16  # rows of x the kernels take; callers use torch.matmul above it
_NAME = "qwenvl_gemv"  # the extension, and the torch.ops namespace its ops register in
_LIBRARY = _NAME + (".pyd" if sys.platform == "win32" else ".so")
_HERE = Path(__file__).parent
_LAYOUT = 2  # bump when the cache folder's layout changes
_lock = threading.Lock()
_module: Any | None = None
_tried = False
_status = "not loaded yet"  # what describe() says


def _source_files() -> dict[str, bytes]:
    """Every C++ source and header of the extension, by name: what the build compiles and copies,
    and what its cache key hashes."""
    files = sorted(p for p in _HERE.iterdir() if p.suffix in (".cpp", ".h"))
    return {p.name: p.read_bytes() for p in files}


def _cpu_flags() -> str:
    """CPU feature flags, so a shared home never reuses a -march=native build on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _march() -> str:
    """The -march of the build: ``native`` unless ``QWENVL_KERNELS_MARCH`` names another (e.g.
    ``x86-64`` for the portable scalar path, which the tests check on machines that have SIMD)."""
    return os.environ.get("QWENVL_KERNELS_MARCH", "native")


def _cflags() -> list[str]:
    # -fopenmp: at::parallel_for is inline OpenMP, serial without it (the libgomp.so.1 it needs
    # is the one torch has already loaded); -fno-trapping-math lets float selects vectorise
    # (decode.cpp's exp)
    return ["-O3", f"-march={_march()}", "-fopenmp", "-fno-trapping-math"]


def _compiler() -> str:
    """The C++ compiler torch.utils.cpp_extension will run (``$CXX`` or ``c++``): its resolved
    path and version line, or why there is none."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        return f"{cxx} (not found)"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        version = (out.stdout.splitlines() or [""])[0]
    except (OSError, subprocess.SubprocessError) as e:
        version = f"({e})"
    return f"{os.path.realpath(path)} {version}"


def _key_inputs(sources: dict[str, bytes]) -> dict[str, Any]:
    """What the built library depends on, and nothing about where things are installed."""
    return {
        "layout": _LAYOUT,
        "sources": {name: hashlib.sha256(data).hexdigest() for name, data in sources.items()},
        "torch": [
            torch.__version__,
            torch.version.git_version,
            torch.version.cuda,
            torch.version.hip,
            bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
        ],
        "python": [sys.implementation.cache_tag, sysconfig.get_config_var("EXT_SUFFIX")],
        "machine": platform.machine(),
        "cpu": _cpu_flags() if _march() == "native" else None,
        "compiler": _compiler(),
        "cflags": _cflags(),
    }


def _cache_root() -> Path:
    return Path.home() / ".cache" / "qwenvl" / "kernels"


@contextlib.contextmanager
def _file_lock(path: Path, waiting: str) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` while the block runs (False, and no lock, where the file
    system or platform has none: the atomic rename alone then keeps builds whole)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield False
        return
    with open(path, "a") as f:
        locked = True
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.warning(waiting)
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # e.g. a file system without locks
            locked = False
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


# Run by the child process that builds: cpp_extension.load compiles with ninja in the folder
# given, then loads the library (in the child, which exits).
_BUILD = """
import json, sys
from torch.utils import cpp_extension
name, folder, sources, cflags = json.loads(sys.argv[1])
try:
    cpp_extension.load(name=name, sources=[folder + "/" + s for s in sources],
                       build_directory=folder, extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                       is_python_module=False, verbose=False)
except Exception as e:
    print(str(e).strip(), file=sys.stderr)
    sys.exit(1)
"""


def _compile(folder: Path, sources: list[str]) -> None:
    """Build the library in ``folder`` (which holds ``sources``) in a child process, so this
    process only ever loads the library from its final place. ninja comes from PATH, else from
    this environment's scripts folder (an environment used without being activated)."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        extra = [sysconfig.get_path("scripts")]
        with contextlib.suppress(ImportError, AttributeError):
            import ninja  # type: ignore[import-not-found]

            extra.append(ninja.BIN_DIR)
        path = os.pathsep.join([*extra, path])
    arg = json.dumps([_NAME, str(folder), sources, _cflags()])
    r = subprocess.run(
        [sys.executable, "-c", _BUILD, arg],
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 or not (folder / _LIBRARY).is_file():
        lines = (r.stderr or r.stdout).replace(f"{folder}{os.sep}", "").strip().splitlines()
        raise RuntimeError("\n".join(lines[-40:]) or f"the build exited with {r.returncode}")


def _ensure_built() -> Path:
    """The cache folder holding this build's library, built first if it is not there."""
    sources = _source_files()
    inputs = _key_inputs(sources)
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    root = _cache_root()
    final = root / digest
    if (final / _LIBRARY).is_file():
        return final
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx} is not on PATH")
    root.mkdir(parents=True, exist_ok=True)
    waiting = f"qwenvl: waiting for another process compiling the CPU kernels into {final}"
    with _file_lock(root / f"{digest}.lock", waiting) as locked:
        if (final / _LIBRARY).is_file():  # built by the process we waited for
            return final
        if locked:  # nobody else is building this key: earlier builds' leftovers are dead
            for old in root.glob(f".{digest}.*"):
                shutil.rmtree(old, ignore_errors=True)
        logger.warning("qwenvl: compiling CPU kernels (first use, ~20 s) into %s", final)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=root))
        try:
            for name, data in sources.items():
                (tmp / name).write_bytes(data)
            (tmp / "build-key.json").write_text(json.dumps(inputs, indent=1, sort_keys=True))
            _compile(tmp, [n for n in sources if n.endswith(".cpp")])
            for obj in tmp.glob("*.o"):
                obj.unlink()
            tmp.chmod(0o755)  # mkdtemp's 0700 is for the build, not the result
            if final.exists() and locked:  # a folder without its library: a wreck, not a build
                shutil.rmtree(final)
            try:
                tmp.rename(final)
            except OSError:
                if not (final / _LIBRARY).is_file():
                    raise
                # without a lock another process got there first; its build is the same
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("qwenvl: CPU kernels compiled in %.1f s", time.perf_counter() - start)
    return final


def _reason(e: BaseException) -> str:
    """One line for describe(): a build's first compiler error, else the message's first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    line = next((x for x in lines if "error:" in x.lower()), lines[0])
    return line if len(line) <= 200 else line[:197] + "..."


def _load() -> Any | None:
    """Build (or reuse) the extension once per process; None, with one warning, if it fails."""
    global _module, _tried, _status
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get("QWENVL_KERNELS", "1") == "0":
            logger.info("qwenvl CPU kernels disabled by QWENVL_KERNELS=0")
            _status = "disabled by QWENVL_KERNELS=0"
        else:
            march = _march()
            try:
                folder = _ensure_built()
                torch.ops.load_library(str(folder / _LIBRARY))  # registers torch.ops.qwenvl_gemv.*
                _module = getattr(torch.ops, _NAME)
                _status = (
                    f"CPU kernels active ({_module.isa()} path, -march={march} build, {folder})"
                )
            except Exception as e:  # no compiler, no ninja, read-only home, ...
                logger.warning("qwenvl CPU kernels unavailable, using torch: %s", e)
                _module = None
                _status = "unavailable: " + _reason(e)
        _tried = True
        return _module


def available() -> bool:
    """True if the extension is built and enabled (builds it on the first call)."""
    return _load() is not None


def describe() -> str:
    """One line on the kernel path in use (building the kernels first if need be): "CPU kernels
    active (<isa> path, -march=<m> build, <cache folder>)", "disabled by QWENVL_KERNELS=0" or
    "unavailable: <reason>"."""
    _load()
    return _status


def isa() -> str | None:
    """SIMD path of the build ("avx512", "avx2" or "scalar"), None if unavailable."""
    mod = _load()
    return None if mod is None else str(mod.isa())


def applies(*tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """True where ``rms_norm``/``silu_mul``/``decode_attention`` may stand in for the torch ops:
    CPU tensors of ``dtypes`` that autograd does not track (inference), with the extension
    built."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in dtypes:
            return False
        if t.requires_grad and torch.is_grad_enabled():
            return False
    return available()


def _require() -> Any:
    mod = _load()
    if mod is None:
        raise RuntimeError("qwenvl CPU kernels are unavailable (see the earlier warning)")
    return mod


HUGE_PAGE = 2 * 2**20


def huge_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU tensor of >= 2 MB in 2 MB-aligned memory advised for 2 MB pages
    (Linux transparent huge pages, ``madvise`` mode), which the decode GEMVs stream a few percent
    faster than 4 KB pages; ``t`` itself when smaller, not on the CPU, or without the
    extension."""
    if t.device.type != "cpu" or t.numel() * t.element_size() < HUGE_PAGE or not available():
        return t
    return _require().huge_page_copy(t)


def bf16_attention_applies(q: torch.Tensor) -> bool:
    """True where ``bf16_attention`` pays: a float32 CPU inference tensor with a head_dim it takes,
    on a build with AVX512-BF16 dot products (elsewhere its plain loops are slower than SDPA)."""
    d = q.shape[-1]
    return applies(q) and d % 16 == 0 and 16 <= d <= 128 and _bf16_dot_build()


@functools.cache
def _bf16_dot_build() -> bool:
    """Whether the loaded build has the AVX512-BF16 micro-kernels (asked once: the paged
    attention asks every layer of every step)."""
    return bool(_require().bf16_attention_native())


def bf16_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: list[int],
    cu_keys: list[int] | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Attention within each segment for float32 q ``[Nq, H, D]`` and k, v ``[Nk, Hkv, D]`` (H a
    multiple of Hkv): segment i's queries ``cu_seqlens[i]:cu_seqlens[i+1]`` attend its keys
    ``cu_keys[i]:cu_keys[i+1]`` (default: the same rows), all of them or, ``causal``, those up to
    their own position, the queries being the segment's last tokens. q/sqrt(D), k, v and the
    softmax weights are rounded to bf16, the sums float32 (attention.cpp); returns float32 ``[Nq,
    H, D]``."""
    cu_q = list(cu_seqlens)
    return _require().bf16_attention(
        q, k, v, cu_q, cu_q if cu_keys is None else list(cu_keys), causal
    )


def linear_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias`` for x [M<=16, K] fp32/bf16 and bf16 w [N, K]; result in x's dtype."""
    return _require().linear_bf16(x, w, bias)


def linear_int8(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``(x @ q.T) * scale + bias`` for int8 q [N, K] (or tiled: ``tile_int8(q)``) and fp32 scale
    [N]; result in x's dtype."""
    return _require().linear_int8(x, q, scale, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x * rsqrt(mean(x^2, -1) + eps)`` over the last dim; float32 CPU tensors, no
    autograd."""
    return _require().rms_norm(x, weight, eps)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` for ``x = [g | u]`` split in halves of the last dim; float32 or bf16 CPU
    (bf16: computed in float32, the result rounded to bf16)."""
    return _require().silu_mul(x)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    keys: torch.Tensor,
    lens: torch.Tensor,
) -> torch.Tensor:
    """One decode token per row ``t``: rotary (rotate-half, ``cos/sin [T, D]``) on ``q [T, H*D]``
    and ``k [T, Hkv*D]``; ``k``/``v`` written to cache slot ``slots[t]`` of ``k_cache/v_cache
    [slots, Hkv, D]``; then GQA attention (scale ``D**-0.5``) over the slots ``keys[t,
    :lens[t]]``. Returns ``[T, H*D]``. float32 CPU tensors; q/k/v rows may be strided views."""
    return _require().decode_attention(q, k, v, cos, sin, k_cache, v_cache, slots, keys, lens)


def decode_layers(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    params: list[torch.Tensor | None],
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    slots: torch.Tensor,
    keys: torch.Tensor,
    lens: torch.Tensor,
    num_heads: int,
    eps: float,
) -> None:
    """A packed Qwen2 decoder's layers for one decode token per row of ``x [T<=16, hidden]``
    (updated in place to the last layer's output, before the final norm): per layer ``params``
    holds 14 entries, ``input_layernorm.weight``, q/k/v, o, ``post_attention_layernorm.weight``,
    gate/up and down, each linear as (weight, scale, bias) of ``PackedLinear.kernel_params``.
    Attention as ``decode_attention`` with ``k_caches[l]``/``v_caches[l]``. One parallel region
    for all layers (layers.cpp)."""
    _require().decode_layers(x, cos, sin, params, k_caches, v_caches, slots, keys, lens,
                             num_heads, eps)  # fmt: skip


@torch.no_grad()
def quantize_int8(w: torch.Tensor, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``w ~= q * scale[:, None]`` with ``|w - q*s| <= s/2``.

    ``scale = amax/127`` per row (1.0 for all-zero rows, whose q is 0). Rows are converted in
    chunks so a vocabulary-sized matrix never needs a full fp32 copy.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_int8 expects a 2-D floating tensor, got {w.dtype} {w.shape}")
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], rows_per_chunk):
        wf = w[r : r + rows_per_chunk].float()
        amax = wf.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q[r : r + rows_per_chunk] = torch.round(wf / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[r : r + rows_per_chunk] = s
    return q, scale


TILE = (8, 16)  # rows x columns of one step of the tiled int8 layout
TILE_MAX_K = 4096  # longer rows stream faster in the row layout (see tiles_pay)


def can_tile(n: int, k: int) -> bool:
    return n % TILE[0] == 0 and k % TILE[1] == 0


def tiles_pay(n: int, k: int) -> bool:
    """Whether an int8 ``[n, k]`` weight decodes faster tiled: rows of up to 4 KB end before the
    hardware prefetchers ramp up (a 4096x1536 GEMV at batch 1: 0.84 of a plain read against 0.64
    in rows), while longer rows stream better as rows (1536x8960: 0.84 against 0.80)."""
    return can_tile(n, k) and k <= TILE_MAX_K


def tile_int8(q: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` int8 -> ``[N/8, K/16, 8, 16]``: every 8 output rows become one sequential
    stream (16 columns of each row in turn), which the decode GEMV reads at DRAM speed even when
    rows are short. Needs ``can_tile(N, K)``."""
    n, k = q.shape
    if not can_tile(n, k):
        raise ValueError(f"tile_int8 needs N % 8 == 0 and K % 16 == 0, got {tuple(q.shape)}")
    r, c = TILE
    return q.view(n // r, r, k // c, c).permute(0, 2, 1, 3).contiguous()


def untile_int8(qt: torch.Tensor) -> torch.Tensor:
    """The ``[N, K]`` view back (a copy) of a ``tile_int8`` weight."""
    nt, kt, r, c = qt.shape
    return qt.permute(0, 2, 1, 3).reshape(nt * r, kt * c)


# int4 weights (int4.cpp): output rows in tiles of 8, columns in groups of G (32, 64 or a multiple
# of 128), one block of 4 G + 32 bytes per (tile, group): 8 rows x G/2 bytes of nibbles (per unit
# of u = min(G, 128) columns, byte j = column j | column j + u/2 << 4), then 8 fp16 scales and 8
# fp16 mins; w = q * scale + min.
INT4_ROWS = 8
INT4_UNIT = 128


def int4_shape(n: int, k: int, group_size: int) -> tuple[int, int, int]:
    """The packed int4 tensor's shape for an ``[n, k]`` weight in groups of ``group_size``."""
    if not (group_size in (32, 64) or (group_size > 0 and group_size % INT4_UNIT == 0)) or (
        k % group_size
    ):
        raise ValueError(
            f"int4 needs a group size of 32, 64 or a multiple of {INT4_UNIT} that divides "
            f"in_features, got group {group_size} for {k} columns"
        )
    return (n + INT4_ROWS - 1) // INT4_ROWS, k // group_size, 4 * group_size + 32


def _meta_bytes(t: torch.Tensor, n8: int, ng: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-row fp16 values ``[n8 * 8, ng]`` -> the blocks' ``[n8, ng, 16]`` bytes (8 rows each)."""
    return t.view(n8, INT4_ROWS, ng).permute(0, 2, 1).contiguous().view(dtype)


def _meta_values(packed: torch.Tensor, off: int, n: int) -> torch.Tensor:
    """The 8 fp16 values at byte ``off`` of every block -> float32 ``[n, ng]`` per row."""
    n8, ng, _ = packed.shape
    t = packed[:, :, off : off + 16].contiguous().view(torch.float16)  # [n8, ng, 8]
    return t.permute(0, 2, 1).reshape(n8 * INT4_ROWS, ng)[:n].float()


@torch.no_grad()
def pack_int4(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """``q [N, K]`` (values 0..15), ``scale``/``minimum [N, K / G]`` (``w = q * scale + min``)
    -> the kernels' uint8 blocks ``[ceil(N/8), K/G, 4G+32]`` (scale and min rounded to fp16)."""
    n, k = q.shape
    ng = scale.shape[1]
    g = k // ng if ng else 0
    n8, _, bb = int4_shape(n, k, g)
    if scale.shape != (n, ng) or minimum.shape != (n, ng) or g * ng != k:
        shapes = f"scales {tuple(scale.shape)} / mins {tuple(minimum.shape)}"
        raise ValueError(f"{shapes} do not fit q {(n, k)}")
    pad = n8 * INT4_ROWS - n
    q = q.to(torch.uint8)
    s16 = scale.to(torch.float16)
    m16 = minimum.to(torch.float16)
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
        s16 = torch.cat([s16, s16.new_zeros(pad, ng)])
        m16 = torch.cat([m16, m16.new_zeros(pad, ng)])
    u = min(g, INT4_UNIT)  # columns per unit of nibbles: byte j = column j | column j + u/2 << 4
    qv = q.view(n8, INT4_ROWS, k // u, 2, u // 2)
    nib = qv[:, :, :, 0] | (qv[:, :, :, 1] << 4)  # [n8, 8, K/u, u/2]
    nib = nib.reshape(n8, INT4_ROWS, ng, g // 2).permute(0, 2, 1, 3).reshape(n8, ng, -1)

    meta = [_meta_bytes(t, n8, ng, torch.uint8) for t in (s16, m16)]
    out = torch.cat([nib, *meta], dim=2)
    assert out.shape[2] == bb
    return out.contiguous()


@torch.no_grad()
def unpack_int4(packed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pack_int4``'s inverse: (q [N, K] uint8, scale [N, K/G] fp32, min [N, K/G] fp32)."""
    n8, ng, bb = packed.shape
    g = (bb - 32) // 4
    k = ng * g
    u = min(g, INT4_UNIT)
    nib = packed[:, :, : INT4_ROWS * g // 2].reshape(n8, ng, INT4_ROWS, g // u, u // 2)
    q = torch.stack([nib & 0xF, nib >> 4], dim=4)  # [n8, ng, 8, G/u, 2, u/2]
    q = q.permute(0, 2, 1, 3, 4, 5).reshape(n8 * INT4_ROWS, k)[:n]

    base = INT4_ROWS * g // 2
    return q.contiguous(), _meta_values(packed, base, n), _meta_values(packed, base + 16, n)


def int8_group_shape(n: int, k: int, group_size: int) -> tuple[int, int, int]:
    """The packed 8-bit group tensor's shape (GPTQ-Int8) for ``[n, k]`` in groups of
    ``group_size`` (a multiple of 32 dividing k)."""
    if group_size <= 0 or group_size % 32 or k % group_size:
        raise ValueError(
            f"8-bit groups need a group size that is a multiple of 32 and divides in_features, "
            f"got group {group_size} for {k} columns"
        )
    return (n + INT4_ROWS - 1) // INT4_ROWS, k // group_size, 8 * group_size + 32


@torch.no_grad()
def pack_int8_groups(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """``q [N, K]`` (0..255), ``scale``/``minimum [N, K / G]`` (``w = q * scale + min``) -> the
    kernels' int8 blocks ``[ceil(N/8), K/G, 8G+32]``: per tile and group 8 rows of ``q - 128``
    (signed, column order), then fp16 scales and fp16 ``min + 128 * scale`` (int4.cpp)."""
    n, k = q.shape
    ng = scale.shape[1]
    g = k // ng if ng else 0
    n8, _, bb = int8_group_shape(n, k, g)
    if scale.shape != (n, ng) or minimum.shape != (n, ng) or g * ng != k:
        raise ValueError(f"scales {tuple(scale.shape)} / mins {tuple(minimum.shape)} do not fit q")
    pad = n8 * INT4_ROWS - n
    qs = (q.to(torch.int16) - 128).to(torch.int8)
    s16 = scale.to(torch.float16)
    m16 = (minimum.double() + 128 * s16.double()).to(torch.float16)
    if pad:
        qs = torch.cat([qs, qs.new_zeros(pad, k)])
        s16 = torch.cat([s16, s16.new_zeros(pad, ng)])
        m16 = torch.cat([m16, m16.new_zeros(pad, ng)])
    rows = qs.view(n8, INT4_ROWS, ng, g).permute(0, 2, 1, 3).reshape(n8, ng, INT4_ROWS * g)

    meta = [_meta_bytes(t, n8, ng, torch.int8) for t in (s16, m16)]
    out = torch.cat([rows, *meta], dim=2)
    assert out.shape[2] == bb
    return out.contiguous()


@torch.no_grad()
def unpack_int8_groups(
    packed: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pack_int8_groups``'s stored form: (signed q' [N, K] int8, scale, min' [N, K/G] fp32)
    with ``w = q' * scale + min'``."""
    n8, ng, bb = packed.shape
    g = (bb - 32) // 8
    q = packed[:, :, : INT4_ROWS * g].reshape(n8, ng, INT4_ROWS, g).permute(0, 2, 1, 3)
    q = q.reshape(n8 * INT4_ROWS, ng * g)[:n]

    base = INT4_ROWS * g
    return q.contiguous(), _meta_values(packed, base, n), _meta_values(packed, base + 16, n)


def linear_int4(
    x: torch.Tensor,
    packed: torch.Tensor,
    n: int,
    bias: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x[:, perm] @ w.T + bias`` for x [M<=16, K] fp32/bf16 and the int4 weight ``packed``
    (``pack_int4``) of ``n`` output rows; x is rounded to int8 per (row, group) inside. ``perm``
    (int64 [K], GPTQ act-order) is gathered while x is quantised, not as a separate pass."""
    return _require().linear_int4(x, packed, n, bias, perm)


def dequantize_int4(packed: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 ``[n, K]`` weight of an int4 ``packed`` tensor, or of 8-bit groups
    (``pack_int8_groups``, an int8 tensor), into ``out`` when given."""
    n8, ng, bb = packed.shape
    eight = packed.dtype == torch.int8
    k = ng * ((bb - 32) // (8 if eight else 4))
    if out is None:
        out = torch.empty(n, k, device=packed.device)
    if available() and packed.device.type == "cpu":
        _require().dequantize_int4(packed, n, out)
        return out
    q, s, m = unpack_int8_groups(packed, n) if eight else unpack_int4(packed, n)
    g = k // ng
    w = q.float().view(n, ng, g) * s[:, :, None] + m[:, :, None]
    return out.copy_(w.view(n, k))


@torch.no_grad()
def quantize_int4(
    w: torch.Tensor, group_size: int = 128, refine: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit: ``w ~= q * scale + min`` per ``group_size`` columns of a row.

    Round-to-nearest from the group's [min, max] (``scale = (max - min) / 15``), then ``refine``
    rounds of a least-squares refit of (scale, min) to the chosen q and re-rounding, keeping per
    group whichever has the smaller squared error. Scale and min are rounded to fp16 (what
    ``pack_int4`` stores) before q is chosen. Returns (q uint8 [N, K], scale, min [N, K/G] fp32).
    On the CPU the kernels do it group by group in one pass (a 2B decoder in ~5 s; the torch
    code below, ~25 whole-tensor passes, took 56 s); elsewhere the torch code runs.
    """
    n, k = w.shape
    int4_shape(n, k, group_size)
    if w.device.type == "cpu" and available():
        q, scale, minimum = _require().quantize_int4(w, group_size, refine)
        return q, scale, minimum
    return _quantize_int4_torch(w, group_size, refine)


def _quantize_int4_torch(
    w: torch.Tensor, group_size: int, refine: int, rows_per_chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_int4`` in whole-tensor torch ops (any device; the C++ code's reference)."""
    n, k = w.shape
    ng = k // group_size
    q = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scale = torch.empty(n, ng, device=w.device)
    minimum = torch.empty(n, ng, device=w.device)

    def fit(wf: torch.Tensor, s: torch.Tensor, m: torch.Tensor):
        s = s.half().float()
        m = m.half().float()
        qq = torch.round((wf - m) / s).clamp_(0, 15)
        err = (qq * s + m - wf).square().sum(-1, keepdim=True)
        return qq, s, m, err

    for r in range(0, n, rows_per_chunk):
        wf = w[r : r + rows_per_chunk].float().view(-1, ng, group_size)
        lo, hi = wf.amin(-1, keepdim=True), wf.amax(-1, keepdim=True)
        s0 = (hi - lo) / 15
        s0 = torch.where(s0 > 0, s0, torch.ones_like(s0))
        best = fit(wf, s0, lo)
        for _ in range(refine):
            qq = best[0]
            sq, sqq = qq.sum(-1, keepdim=True), qq.square().sum(-1, keepdim=True)
            sw, sqw = wf.sum(-1, keepdim=True), (qq * wf).sum(-1, keepdim=True)
            det = group_size * sqq - sq * sq
            s1 = (group_size * sqw - sq * sw) / det.clamp(min=1e-30)
            m1 = (sw - s1 * sq) / group_size
            ok = (det > 0) & (s1 > 0)
            cand = fit(wf, torch.where(ok, s1, best[1]), torch.where(ok, m1, best[2]))
            better = cand[3] < best[3]
            best = tuple(torch.where(better, c, b) for c, b in zip(cand, best))
        qq, s, m, _ = best
        q[r : r + rows_per_chunk] = qq.view(-1, k).to(torch.uint8)
        scale[r : r + rows_per_chunk] = s.view(-1, ng)
        minimum[r : r + rows_per_chunk] = m.view(-1, ng)
    return q, scale, minimum
