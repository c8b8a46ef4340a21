"""The engine behind an asyncio server: one background thread steps the engine, every request
streams its events through its own ``asyncio.Queue``.

Coroutines never wait for a model step: new requests and aborts are handed to the stepping thread
through a queue and applied between steps. A client that stops listening (the async generator is
closed, e.g. on disconnect) aborts its request, and its KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from qwenvl.engine.engine import LLMEngine
from qwenvl.errors import EngineDeadError
from qwenvl.outputs import StreamEvent
from qwenvl.processing.prompt import PromptInputs
from qwenvl.sampling import SamplingParams

logger = logging.getLogger(__name__)

_DONE = object()


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qwenvl-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt: PromptInputs, params: SamplingParams, request_id: str
    ) -> AsyncIterator[StreamEvent]:
        """Stream the events of one request; raises the engine's error (e.g. ``PromptError``
        when the request cannot fit) at the first iteration."""
        if self._closed:
            raise RuntimeError("the engine is shut down")
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        self._inbox.put(("add", (prompt, params, request_id)))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)

    # --- the stepping thread -----------------------------------------------------------------
    def _send(self, request_id: str, item: Any) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the client's loop is closed: nobody listens any more
            self._streams.pop(request_id, None)

    def _finish(self, request_id: str, item: Any = _DONE) -> None:
        self._send(request_id, item)
        self._streams.pop(request_id, None)
        self.engine.pop_finished(request_id)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                prompt, params, rid = payload
                try:
                    self.engine.add_request(prompt, params, rid)
                except Exception as e:  # reported to the caller, the engine carries on
                    self._finish(rid, e)
            elif kind == "abort":
                self.engine.abort(payload)
                self._finish(payload)

    def _run(self) -> None:
        engine = self.engine
        while not self._closed:
            self._drain_inbox()
            if not engine.has_unfinished:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                events = engine.step()
            except Exception as e:  # a failed step fails its requests, never the thread
                logger.exception("engine step failed")
                error = e if isinstance(e, EngineDeadError) else RuntimeError(str(e))
                for rid in list(engine.requests):
                    engine.abort(rid)
                    self._finish(rid, error)
                continue
            for event in events:
                self._send(event.request_id, event)
            for rid in list(engine.finished):
                if rid in self._streams:
                    self._finish(rid)
        for rid in list(self._streams):
            self._finish(rid, RuntimeError("the engine is shut down"))
