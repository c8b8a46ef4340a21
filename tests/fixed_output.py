"""Replace what the model generates by a fixed text, for end-to-end tests of output parsing.

Tiny random-weight checkpoints write random text; grounding, tool-call and agent tests need a
known reply that still travels through ``LLM.chat`` (real prompt, real image geometry, real result
assembly). Generation runs as usual (keep ``max_tokens`` small); each finished completion's text
is then swapped for the fixed one.
"""

from __future__ import annotations

import dataclasses

import pytest

from qwenvl.engine.request import Sequence


def fix_output_text(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """Make every completion of ``LLM.chat`` / ``LLM.generate`` read ``text``."""
    output = Sequence.output

    def fixed_output(self):  # type: ignore[no-untyped-def]
        return dataclasses.replace(output(self), text=text)

    monkeypatch.setattr(Sequence, "output", fixed_output)
