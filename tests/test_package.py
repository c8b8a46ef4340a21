"""The package's import: what it does to the interpreter is safe for the program around it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CYCLE = """
import qwenvl  # freezes the objects alive at import, so exit does not walk them

class Node:
    pass

node = Node()
node.self = node  # a reference cycle: only the collector finalises it
node.file = open(sys.argv[1], "w")
node.file.write("written, never closed")
"""


def test_files_in_cycles_made_after_import_are_flushed_at_exit(tmp_path: Path) -> None:
    """Objects made after ``import qwenvl`` stay collectable: an unclosed file reachable only
    through a cycle still gets its buffer written when the interpreter finalises it at exit."""
    out = tmp_path / "out.txt"
    code = "import sys\n" + CYCLE
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=120)
    assert out.read_text() == "written, never closed"
