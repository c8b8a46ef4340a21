"""Fixtures of the processing tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from media_helpers import serve_http


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    yield from serve_http()
