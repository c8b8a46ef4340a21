"""Cold start of the CPU kernels when environments or checkouts alternate.

    python bench/kernel_cold_start.py --python .venv/bin/python /tmp/venv2/bin/python
    python bench/kernel_cold_start.py --python .venv/bin/python --src /tmp/a/src /tmp/b/src

Runs ``import qwenvl.kernels as k; k.available()`` in a fresh process for each (python, source
tree) pair in turn, ``--rounds`` times over, all sharing one kernel cache (a fresh temporary HOME
unless ``--home`` names one), and prints each run's wall time and the time ``available()`` itself
took (the rest of the wall time is Python importing torch and qwenvl). With the build cache keyed
by what the build depends on only, the first run compiles and every later one loads the cached
library in milliseconds; a cache tied to one checkout or environment recompiles (~20 s on 2
cores) whenever they alternate. Each python's own bin folder leads PATH, as if its environment
were activated.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CODE = (
    "import time; import qwenvl.kernels as k; t = time.perf_counter(); ok = k.available(); "
    "print(ok, round(time.perf_counter() - t, 3), k.__file__)"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--python", nargs="+", default=[sys.executable], help="interpreters")
    ap.add_argument("--src", nargs="*", default=[None], help="source trees put on PYTHONPATH")
    ap.add_argument("--home", help="HOME for the runs (default: a fresh temporary folder)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    home = args.home or tempfile.mkdtemp(prefix="qwenvl-cold-")
    pairs = list(itertools.product(args.python, args.src))
    print(f"HOME={home}")
    for r in range(args.rounds):
        for py, src in pairs:
            bindir = str(Path(py).parent)
            env = {**os.environ, "HOME": home, "PATH": bindir + os.pathsep + os.environ["PATH"]}
            env.pop("VIRTUAL_ENV", None)
            if src:
                env["PYTHONPATH"] = src
            t = time.perf_counter()
            out = subprocess.run([py, "-c", CODE], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            ok, inner, where = (out.stdout.split() + ["?", "?", "?"])[:3]
            note = " compiled" if "compiling" in out.stderr else ""
            print(f"round {r + 1}  {py:32s} {src or '-':16s} available={ok:5s} "
                  f"wall {wall:6.2f} s  available() {inner:>6s} s{note}  ({where})")  # fmt: skip
            if out.returncode:
                print(out.stderr[-2000:])


if __name__ == "__main__":
    main()
