"""Running one admitted request through the engine, watching its client all the while.

A `Job`'s events abort the request the moment its client disconnects (`ClientGone`), and count
what it generated and how long it took, for streamed and non-streamed responses alike.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from qwenvl.outputs import StreamEvent
from qwenvl.processing.prompt import PromptInputs
from qwenvl.sampling import SamplingParams
from qwenvl.server.errors import ClientGone, engine_error
from qwenvl.server.state import ServerState, Waiting


async def wait_disconnect(request: Request) -> None:
    """Return once the client has closed the connection (the body was read before)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def next_or_disconnect(agen: AsyncIterator[StreamEvent], request: Request) -> Any:
    """The next event, or None when the stream ended; raises ``ClientGone`` on disconnect.

    Whatever ends the wait (disconnect, or this task being cancelled), the pending step of
    ``agen`` is cancelled and awaited, so the generator's cleanup (the abort) runs now."""
    nxt = asyncio.ensure_future(agen.__anext__())
    gone = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        nxt.cancel()
        await asyncio.gather(nxt, return_exceptions=True)
        raise
    finally:
        gone.cancel()
    if nxt not in done:
        nxt.cancel()
        await asyncio.gather(nxt, return_exceptions=True)
        raise ClientGone()
    try:
        return nxt.result()
    except StopAsyncIteration:
        return None


@dataclass
class Job:
    """One admitted request on its way through the engine."""

    state: ServerState
    request: Request
    prompt: PromptInputs
    params: SamplingParams
    slot: Waiting
    started: float
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    first_token_at: float | None = None
    num_generated: int = 0

    async def events(self) -> AsyncIterator[StreamEvent]:
        """All events; aborts on disconnect (non-streamed responses watch the socket here)."""
        agen = self.state.engine.generate(self.prompt, self.params, self.request_id)
        try:
            while True:
                try:
                    event = await next_or_disconnect(agen, self.request)
                except (ClientGone, asyncio.CancelledError):  # the client went away
                    self.state.metrics.add(aborted=1)
                    raise
                except Exception as e:
                    raise engine_error(e) from e
                if event is None:
                    self.state.metrics.e2e.observe(time.monotonic() - self.started)
                    return
                self._seen(event)
                yield event
        finally:
            self.slot.release()
            await agen.aclose()

    def _seen(self, event: StreamEvent) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.state.metrics.ttft.observe(self.first_token_at - self.started)
            self.slot.release()
        self.num_generated += len(event.token_ids)
        self.state.metrics.add(generation_tokens=len(event.token_ids))


async def start_job(
    state: ServerState,
    request: Request,
    started: float,
    prepare: Callable[[], Awaitable[tuple[PromptInputs, SamplingParams]]],
) -> Job:
    """Admit a request (429 when the queue is full) and ``prepare`` its prompt and parameters
    while it holds a waiting slot; the slot is given back if preparing fails."""
    slot = state.admit()
    try:
        prompt, params = await prepare()
    except BaseException:
        slot.release()
        raise
    return Job(state, request, prompt, params, slot, started)


async def collect(
    job: Job, n: int
) -> tuple[list[str], list[list[int]], list[list[dict]], list[str | None]]:
    """Text, token ids, logprobs and finish reason of each of the ``n`` completions, for a
    non-streamed response (``ClientGone`` if the client leaves first)."""
    texts, ids, reasons = [""] * n, [[] for _ in range(n)], [None] * n
    lps: list[list[dict]] = [[] for _ in range(n)]
    async for ev in job.events():
        texts[ev.index] += ev.text
        ids[ev.index] += ev.token_ids
        lps[ev.index] += ev.logprobs or []
        reasons[ev.index] = ev.finish_reason or reasons[ev.index]
    return texts, ids, lps, reasons
