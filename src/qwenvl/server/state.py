"""What every route shares: the `ServerState` of one app, kept on ``app.state.qwenvl``.

Routes get it with the `State` dependency instead of closing over it, so each route module stands
alone and the app holds the only reference.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends
from starlette.requests import Request

from qwenvl.engine.async_engine import AsyncEngine
from qwenvl.llm import LLM
from qwenvl.server.errors import APIError
from qwenvl.server.metrics import Metrics
from qwenvl.server.settings import ServerSettings


@dataclass
class Waiting:
    """A slot among the server's waiting requests, given back once (first token or failure)."""

    state: ServerState
    held: bool = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.waiting -= 1


@dataclass
class ServerState:
    """The engine, worker pools, metrics and waiting count that all of an app's requests share."""

    llm: LLM
    settings: ServerSettings
    engine: AsyncEngine
    pool: ThreadPoolExecutor  # preprocessing: tokenizing, decoding, resizing
    fetch_pool: ThreadPoolExecutor  # downloads only, each bounded by the media deadline
    metrics: Metrics = field(default_factory=Metrics)
    waiting: int = 0
    started: float = field(default_factory=time.time)  # the models' "created"

    @classmethod
    def create(cls, llm: LLM, settings: ServerSettings) -> ServerState:
        """The engine thread and worker pools serving ``llm`` (closed by `close`)."""
        return cls(
            llm=llm,
            settings=settings,
            engine=AsyncEngine(llm.engine),
            pool=ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="qwenvl-media"),
            fetch_pool=ThreadPoolExecutor(
                settings.fetch_workers, thread_name_prefix="qwenvl-download"
            ),
        )

    def admit(self) -> Waiting:
        """A waiting slot, or 429 with ``Retry-After`` when the queue is full: load beyond it is
        refused up front instead of piling up behind the engine."""
        if self.waiting >= self.settings.max_waiting_requests:
            raise APIError(
                429,
                f"the server has {self.waiting} requests waiting (the limit is "
                f"{self.settings.max_waiting_requests}); retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        self.waiting += 1
        return Waiting(self)

    def close(self) -> None:
        """Stop the engine thread and drop queued preprocessing and downloads."""
        self.engine.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)


def get_state(request: Request) -> ServerState:
    """The state of the app serving ``request``."""
    return request.app.state.qwenvl


# A route parameter annotated ``State`` receives the app's `ServerState`.
State = Annotated[ServerState, Depends(get_state)]
