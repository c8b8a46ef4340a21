"""The CPU kernel extension builds wherever it can, for every SIMD path, each path is right, and
its build cache is shared, built once and never rebuilt when checkouts or environments alternate.

The kernel tests skip where the extension is unavailable (no compiler), so without these checks a
source that stops compiling would turn CI's kernel tests into skips instead of failures. And a
machine only runs the paths its CPU has: each path (scalar, AVX2, AVX-512) is built and checked
by the kernel tests where the CPU can run it, and skipped with the reason where it cannot; every
x86 path is at least compiled (``-fsyntax-only``) everywhere.
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl import kernels

TESTS = Path(__file__).parent
SOURCES = Path(kernels.__file__).parent
CXX = shutil.which(os.environ.get("CXX", "c++"))
HAVE_COMPILER = bool(CXX and shutil.which("ninja"))
ENABLED = os.environ.get("QWENVL_KERNELS", "1") != "0"
X86 = platform.machine() in ("x86_64", "AMD64")
LIBRARY = "qwenvl_gemv.so"
ACTIVE = re.compile(r"CPU kernels active \((\w+) path, -march=(\S+) build, (.+)\)")
needs_build = pytest.mark.skipif(
    not (HAVE_COMPILER and ENABLED and X86 and sys.platform == "linux"),
    reason="needs Linux on x86 with a C++ compiler and ninja, kernels enabled",
)


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


HASWELL = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}
SKYLAKE_AVX512 = HASWELL | {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
SIMD_PATHS = {  # isa() of the build: the -march that selects it, the CPU flags it runs on
    "scalar": ("x86-64", set()),
    "avx2": ("haswell", HASWELL),
    "avx512": ("skylake-avx512", SKYLAKE_AVX512),
}


@pytest.mark.skipif(not (HAVE_COMPILER and ENABLED), reason="no C++ compiler or ninja here")
def test_extension_builds_where_a_compiler_is_present() -> None:
    assert kernels.available(), "gemv.cpp failed to build: see the warning logged by qwenvl.kernels"
    assert kernels.isa() in ("avx512", "avx2", "scalar")


def test_describe_names_the_library_this_process_runs() -> None:
    text = kernels.describe()
    if not kernels.available():
        expected = "disabled by QWENVL_KERNELS=0" if not ENABLED else "unavailable: "
        assert text.startswith(expected), text
        return
    m = ACTIVE.fullmatch(text)
    assert m, text
    assert m.group(1) == kernels.isa()
    library = Path(m.group(3)) / LIBRARY
    assert library.is_file(), text
    maps = Path("/proc/self/maps")
    if maps.exists():  # the library mapped into this process is the one named
        assert str(library.resolve()) in maps.read_text(), text


def test_describe_says_disabled_or_why_unavailable(tmp_path) -> None:
    code = "from qwenvl import kernels; print(kernels.describe())"

    def describe(**env: str) -> str:
        r = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "HOME": str(tmp_path), **env},
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip()

    assert describe(QWENVL_KERNELS="0") == "disabled by QWENVL_KERNELS=0"
    assert describe(QWENVL_KERNELS="1", CXX="no-such-compiler") == (
        "unavailable: no C++ compiler: no-such-compiler is not on PATH"
    )


def test_every_kernel_source_is_package_data() -> None:
    """A wheel without kernels.h builds nothing: every file the build compiles must ship."""
    pyproject = TESTS.parent.parent / "pyproject.toml"
    tomllib = pytest.importorskip("tomllib")
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["qwenvl"]
    files = sorted(kernels._source_files())
    assert {"gemv.cpp", "decode.cpp", "layers.cpp", "int4.cpp", "kernels.h"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(f"kernels/{name}", p) for p in patterns), name


# Run in a fresh process: how long available() takes, and what it loaded.
PROBE = """
import json, sys, time
from qwenvl import kernels
t = time.perf_counter()
ok = kernels.available()
print(json.dumps({"available": ok, "seconds": time.perf_counter() - t,
                  "file": kernels.__file__, "describe": kernels.describe()}))
"""


def _compiles(log: Path) -> list[str]:
    """The compile and link commands the logging compiler wrapper ran (not its --version)."""
    if not log.exists():
        return []
    return [
        line for line in log.read_text().splitlines() if " -c " in f" {line} " or "-shared" in line
    ]


@pytest.fixture(scope="module")
def shared_build(tmp_path_factory) -> dict:
    """Two checkouts of the package (copies in two folders) start at once in a fresh HOME, with a
    compiler wrapper that logs every compiler run and ``-march=x86-64`` (the scalar path)."""
    if not (HAVE_COMPILER and ENABLED and X86 and sys.platform == "linux"):
        pytest.skip("needs Linux on x86 with a C++ compiler and ninja, kernels enabled")
    root = tmp_path_factory.mktemp("kernel-cache")
    home, log, wrapper = root / "home", root / "cxx.log", root / "logging-c++"
    home.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{CXX}" "$@"\n')
    wrapper.chmod(0o755)
    checkouts = []
    for name in ("checkout-a", "checkout-b"):
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(SOURCES.parent, root / name / "qwenvl", ignore=skip)
        checkouts.append(root / name)
    env = {**os.environ, "HOME": str(home), "CXX": str(wrapper), "QWENVL_KERNELS_MARCH": "x86-64"}

    def start(checkout: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", PROBE],
            env={**env, "PYTHONPATH": str(checkout)},
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = [start(c) for c in checkouts]  # both find no build and race to make it
    first = [(p.wait(), *p.communicate()) for p in procs]
    return {"home": home, "log": log, "env": env, "checkouts": checkouts, "first": first,
            "start": start}  # fmt: skip


def test_concurrent_first_builds_both_succeed_and_build_once(shared_build) -> None:
    outs = []
    for (rc, out, err), checkout in zip(shared_build["first"], shared_build["checkouts"]):
        assert rc == 0, err[-3000:]
        outs.append(json.loads(out))
        assert outs[-1]["available"], err[-3000:]
        assert outs[-1]["file"].startswith(str(checkout)), outs[-1]  # each ran its own checkout
    errs = [err for _, _, err in shared_build["first"]]
    # one process compiled (and said so), the other waited for it or found it done
    assert sum("qwenvl: compiling CPU kernels (first use" in e for e in errs) == 1, errs
    assert outs[0]["describe"] == outs[1]["describe"]
    compiles = _compiles(shared_build["log"])
    links = [c for c in compiles if "-shared" in c]
    assert len(links) == 1 and len(compiles) == 1 + len(list(SOURCES.glob("*.cpp"))), compiles
    cache = shared_build["home"] / ".cache" / "qwenvl" / "kernels"
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 1, sorted(cache.iterdir())  # one build, no temporary folder left
    assert (folders[0] / LIBRARY).is_file()
    assert ACTIVE.fullmatch(outs[0]["describe"]).group(3) == str(folders[0])


def test_alternating_checkouts_reuse_the_build_without_compiling(shared_build) -> None:
    """Checkout a, b, a again: with the build in place none of them runs the compiler or rebuilds,
    and loading takes milliseconds (a rebuild takes ~20 s)."""
    a, b = shared_build["checkouts"]
    compiled = _compiles(shared_build["log"])
    cache = shared_build["home"] / ".cache" / "qwenvl" / "kernels"
    (library,) = cache.glob(f"*/{LIBRARY}")
    stat = library.stat()
    for checkout in (a, b, a):
        p = shared_build["start"](checkout)
        rc, (out, err) = p.wait(), p.communicate()
        assert rc == 0, err[-3000:]
        result = json.loads(out)
        assert result["available"] and result["file"].startswith(str(checkout)), result
        assert "compiling" not in err, err
        assert result["seconds"] < 1.0, result
        assert ACTIVE.fullmatch(result["describe"]).group(3) == str(library.parent)
    assert _compiles(shared_build["log"]) == compiled  # no compiler run since the first build
    assert library.stat().st_mtime_ns == stat.st_mtime_ns and library.stat().st_ino == stat.st_ino


@needs_build
@pytest.mark.parametrize("isa", list(SIMD_PATHS))
def test_simd_path_passes_the_kernel_tests(isa: str, request) -> None:
    """Build the path (where the CPU can run it) in a fresh process and run the kernel tests
    against it: the scalar one shares the checkouts' build above; the path this process already
    runs reuses its build."""
    march, needs = SIMD_PATHS[isa]
    missing = needs - _cpu_flags()
    if missing:
        pytest.skip(
            "CPU lacks AVX-512F" if "avx512f" in missing else f"CPU lacks {sorted(missing)}"
        )
    if kernels.isa() == isa:
        env = {
            **os.environ,
            "QWENVL_KERNELS_MARCH": os.environ.get("QWENVL_KERNELS_MARCH", "native"),
        }
    else:
        env = {**request.getfixturevalue("shared_build")["env"], "QWENVL_KERNELS_MARCH": march}
    code = (
        "import sys, pytest; from qwenvl import kernels; "
        f"assert kernels.isa() == {isa!r}, kernels.describe(); "
        "sys.exit(pytest.main(['-q', '-o', 'addopts=', '-p', 'no:cacheprovider', "
        f"{str(TESTS / 'test_gemv.py')!r}, {str(TESTS / 'test_decode_ops.py')!r}, "
        f"{str(TESTS / 'test_int4.py')!r}, {str(TESTS / 'test_attention.py')!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout, r.stdout[-500:]


@pytest.mark.skipif(not (HAVE_COMPILER and X86), reason="needs an x86 C++ toolchain")
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_every_simd_path_compiles(isa: str) -> None:
    """Compile-only (``-fsyntax-only``) where this machine lacks the ISA to run the path (where it
    has it, test_simd_path_passes_the_kernel_tests builds and runs it)."""
    march, needs = SIMD_PATHS[isa]
    if ENABLED and HAVE_COMPILER and needs <= _cpu_flags():
        pytest.skip(f"the CPU runs the {isa} path: test_simd_path_passes_the_kernel_tests[{isa}]")
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
    for source in ("gemv.cpp", "decode.cpp", "layers.cpp", "int4.cpp", "attention.cpp"):
        r = subprocess.run([*cmd, str(SOURCES / source)], capture_output=True, text=True)
        assert r.returncode == 0, source + ":\n" + r.stderr[-3000:]
