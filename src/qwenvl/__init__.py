"""qwenvl: run, serve and fine-tune Qwen2-VL and Qwen2.5-VL, written from scratch in PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

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
