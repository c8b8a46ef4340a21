"""qwenvl: run, serve and fine-tune Qwen2-VL and Qwen2.5-VL, written from scratch in PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

import atexit  # noqa: E402
import gc  # noqa: E402

# At exit, Python's collector walks every object still alive (torch's import leaves ~10^6) to
# find cycles to finalise: 0.3-0.4 s of a one-shot run, more than llama.cpp takes to start.
# Freezing them first skips that walk; the modules are still torn down, and Python never
# promised finalisers for objects alive at exit.
atexit.register(gc.freeze)

from qwenvl.llm import LLM  # noqa: E402
from qwenvl.outputs import CompletionOutput, RequestOutput, StreamEvent  # noqa: E402
from qwenvl.sampling import SamplingParams  # noqa: E402

__all__ = [
    "LLM",
    "CompletionOutput",
    "RequestOutput",
    "SamplingParams",
    "StreamEvent",
    "__version__",
]
