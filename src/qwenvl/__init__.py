"""qwenvl: run, serve and fine-tune Qwen2-VL and Qwen2.5-VL, written from scratch in PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

import gc  # noqa: E402

from qwenvl.llm import LLM  # noqa: E402
from qwenvl.outputs import CompletionOutput, RequestOutput, StreamEvent  # noqa: E402
from qwenvl.sampling import SamplingParams  # noqa: E402

# The ~10^6 objects torch's import (and ours) leave live as long as the process. At exit, and at
# every full collection, Python's collector walks them all looking for cycles: 0.3-0.4 s of a
# one-shot run, a fifth of a cached cold start. Frozen here, they are skipped; what the program
# makes from now on (its files in reference cycles included) is still collected and finalised.
gc.freeze()

__all__ = [
    "LLM",
    "CompletionOutput",
    "RequestOutput",
    "SamplingParams",
    "StreamEvent",
    "__version__",
]
