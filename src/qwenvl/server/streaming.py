"""The one server-sent-events writer, shared by chat and completions streams.

An endpoint supplies the chunk of each engine event; the writer does the rest the same way for
both: the status from the first event (errors before it are ordinary HTTP errors), the ``usage``
field and final usage chunk of ``stream_options``, an error after the first byte as an error
event, ``data: [DONE]``, and a client that disconnects (its request aborted, the stream ended).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.responses import StreamingResponse

from qwenvl.outputs import StreamEvent
from qwenvl.server.errors import APIError, ClientGone
from qwenvl.server.jobs import Job
from qwenvl.server.protocol import StreamOptions
from qwenvl.server.responses import usage

# A chunk's own fields (``choices`` and any extension) for one event, or None to send nothing.
ChunkOf = Callable[[StreamEvent], dict[str, Any] | None]

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict[str, Any] | str) -> bytes:
    """One SSE event (``data: ...`` and a blank line); a dict as JSON, non-ASCII kept."""
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {body}\n\n".encode()


async def stream_response(
    job: Job,
    head: dict[str, Any],
    chunk_of: ChunkOf,
    options: StreamOptions | None,
    opening: Sequence[dict[str, Any]] = (),
) -> StreamingResponse:
    """Stream ``job`` as chunks ``{**head, **chunk_of(event)}``, after the ``opening`` chunks.

    The first event is awaited before the response starts, so that a request the engine refuses
    still gets its HTTP status (and a client gone by then its 499, via the error handlers)."""
    events = job.events()
    first = await anext(events, None)
    body = _write(job, events, first, head, chunk_of, options, opening)
    return StreamingResponse(body, media_type="text/event-stream", headers=_HEADERS)


async def _write(
    job: Job,
    events: AsyncIterator[StreamEvent],
    first: StreamEvent | None,
    head: dict[str, Any],
    chunk_of: ChunkOf,
    options: StreamOptions | None,
    opening: Sequence[dict[str, Any]],
) -> AsyncIterator[bytes]:
    include_usage = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)
    generated = 0

    def frame(chunk: dict[str, Any]) -> bytes:
        body = {**head, **chunk}
        if include_usage:  # null on every chunk but the last, unless continuous
            body["usage"] = usage(job.prompt, generated) if continuous else None
        return sse(body)

    try:
        for chunk in opening:
            yield frame(chunk)
        ev = first
        while ev is not None:
            generated += len(ev.token_ids)
            chunk = chunk_of(ev)
            if chunk is not None:
                yield frame(chunk)
            ev = await anext(events, None)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(job.prompt, generated)})
    except ClientGone:
        return
    except APIError as e:
        yield sse(e.body())
    finally:
        await events.aclose()
    yield sse("[DONE]")
