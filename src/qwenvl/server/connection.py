"""uvicorn's HTTP/1.1 protocol with a deadline on request headers (the slowloris guard).

uvicorn closes idle keep-alive connections, but a connection that sends its request line and
headers a byte at a time is kept open for as long as the client likes; enough of them exhaust
the server's sockets. `header_deadline_protocol` gives each request's headers a deadline, from
the connection's start or from the previous response, after which the connection is closed.
The transport, parsing and everything else stay uvicorn's (h11).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """An `H11Protocol` whose requests must send all their headers within ``timeout_s``."""

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._headers_done():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self._headers_done():  # waiting for the next request on this connection
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_done(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self._headers_done() and not self.transport.is_closing():
                self.logger.info(
                    "closing %s: no complete request headers in %g s", self.client, timeout_s
                )
                self.transport.close()

    return HeaderDeadline
