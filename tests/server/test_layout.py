"""The server package's shape: small functions and no import cycles between its modules."""

from __future__ import annotations

import ast
from pathlib import Path

import qwenvl.server

PACKAGE = Path(qwenvl.server.__file__).parent
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def test_no_function_is_long() -> None:
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = node.end_lineno - first + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.py:{node.lineno} {node.name} ({lines} lines)")
    assert not long


def _imports(tree: ast.Module, modules: set[str]) -> set[str]:
    """The package's modules ``tree`` imports when it is loaded (not inside functions)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "qwenvl.server":
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qwenvl.server."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {
                a.name.split(".")[2] for a in node.names if a.name.startswith("qwenvl.server.")
            }
    return found & modules


def test_no_import_cycles() -> None:
    trees = _modules()
    graph = {name: _imports(tree, set(trees)) - {name} for name, tree in trees.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, " -> ".join([*path, name])
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in graph:
        visit(name, [])
