"""The CPU kernel extension builds wherever it can, for every SIMD path; its portable path is right.

The kernel tests skip where the extension is unavailable (no compiler), so without these checks a
source that stops compiling would turn CI's kernel tests into skips instead of failures. And a
machine only runs the one path its CPU has: the scalar path (ARM, old x86) and the AVX-512 path
are checked here too, the first by building and running it, the second by compiling it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl import kernels

TESTS = Path(__file__).parent
SOURCES = Path(kernels.__file__).parent
HAVE_COMPILER = all(shutil.which(t) for t in (os.environ.get("CXX", "c++"), "ninja"))
ENABLED = os.environ.get("QWENVL_KERNELS", "1") != "0"
X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.mark.skipif(not (HAVE_COMPILER and ENABLED), reason="no C++ compiler or ninja here")
def test_extension_builds_where_a_compiler_is_present() -> None:
    assert kernels.available(), "gemv.cpp failed to build: see the warning logged by qwenvl.kernels"
    assert kernels.isa() in ("avx512", "avx2", "scalar")


@pytest.mark.skipif(not (HAVE_COMPILER and ENABLED and X86), reason="needs an x86 C++ toolchain")
def test_scalar_path_passes_the_kernel_tests(tmp_path) -> None:
    """Build for plain x86-64 (no AVX) in a fresh process and run the kernel tests against it."""
    env = {**os.environ, "QWENVL_KERNELS_MARCH": "x86-64", "HOME": str(tmp_path)}
    code = (
        "import sys, pytest; from qwenvl import kernels; "
        "assert kernels.isa() == 'scalar', kernels.isa(); "
        "sys.exit(pytest.main(['-q', '-o', 'addopts=', '-p', 'no:cacheprovider', "
        f"{str(TESTS / 'test_gemv.py')!r}, {str(TESTS / 'test_decode_ops.py')!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout, r.stdout[-500:]


@pytest.mark.skipif(not (HAVE_COMPILER and X86), reason="needs an x86 C++ toolchain")
@pytest.mark.parametrize("march", ["skylake-avx512", "haswell"])
def test_every_simd_path_compiles(march: str) -> None:
    """Compile-only (``-fsyntax-only``): this machine may lack the ISA to run the path."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd = [
        os.environ.get("CXX", "c++"),
        "-std=c++17",
        "-fsyntax-only",
        f"-march={march}",
        "-fopenmp",
        *includes,
    ]
    for source in ("gemv.cpp", "decode.cpp", "layers.cpp"):
        r = subprocess.run([*cmd, str(SOURCES / source)], capture_output=True, text=True)
        assert r.returncode == 0, source + ":\n" + r.stderr[-3000:]
