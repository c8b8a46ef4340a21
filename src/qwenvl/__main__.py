"""``python -m qwenvl``: the same entry point as the ``qwenvl`` console script."""

from __future__ import annotations

import sys

from qwenvl.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
