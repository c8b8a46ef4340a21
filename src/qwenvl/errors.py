"""The exceptions qwenvl raises on bad input.

Every user-facing failure is one of these, so callers (the CLI, the server) can turn them into a
clear message without catching library tracebacks. All subclass ``ValueError`` where the cause is
bad input.
"""

from __future__ import annotations


class QwenVLError(Exception):
    """Base class of every error qwenvl raises on purpose."""


class ConfigError(QwenVLError, ValueError):
    """A checkpoint's config.json (or another config file) is missing, malformed or unsupported."""


class CheckpointError(QwenVLError, ValueError):
    """A checkpoint folder cannot be loaded: missing files, missing or unexpected tensors, bad
    shapes.
    """


class MediaError(QwenVLError, ValueError):
    """An image or video cannot be used: unreadable, unsupported, too large, unreachable."""


class MediaTooLargeError(MediaError):
    """Media over a size limit: encoded bytes, decoded pixels, or a decompression bomb. The
    server answers these with 413; the type, not the message's wording, decides that."""


class MediaTimeoutError(MediaError):
    """Fetching media took longer than the policy's deadline (connect, headers and body
    together)."""


class PromptError(QwenVLError, ValueError):
    """Messages, tools or sampling options that cannot be turned into a prompt."""


class ContextLengthError(PromptError):
    """A prompt (text plus image and video tokens) that cannot fit the context or KV budget."""


class ActionError(QwenVLError, ValueError):
    """A visual agent's tool call cannot be turned into an action: no call, an unknown tool or
    action, or a missing or malformed argument (see :mod:`qwenvl.agents`)."""


class EngineDeadError(RuntimeError):
    """The engine cannot run any more steps (a tensor-parallel worker process is gone): every
    request fails with this until it is restarted. The server answers 503 and shuts down."""
