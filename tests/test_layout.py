"""The package's shape (issue: one model seam): no import cycles anywhere in ``qwenvl`` (imports
inside functions and ``TYPE_CHECKING`` blocks count: they are cycles waiting to bite), and no
function over 80 lines in the server, the engine and the models."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import qwenvl

ROOT = Path(qwenvl.__file__).parent
SHORT_PACKAGES = ("server", "engine", "models")
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("qwenvl", *path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every qwenvl module ``path`` imports, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
                elif base in modules:
                    found.add(base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
    return found - {name}


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, "import cycle: " + " -> ".join([*path[path.index(name) :], name])
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in graph:
        visit(name, [])


def test_the_cycle_check_sees_a_cycle(tmp_path: Path, monkeypatch) -> None:
    """The check itself: a two-module cycle made of function-level imports is found."""
    pkg = tmp_path / "qwenvl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from qwenvl import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import qwenvl.a\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "qwenvl.a -> qwenvl.b -> qwenvl.a" in str(e)
    else:
        raise AssertionError("the cycle was not found")


def test_no_function_is_long() -> None:
    long = []
    for package in SHORT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    lines = node.end_lineno - first + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long
