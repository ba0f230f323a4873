"""uvicorn's HTTP protocol (httptools), with the writes of one answer sent together, and the
defences a server facing firmware in the field needs.

- **One write per answer.** uvicorn writes an answer's status line and headers as soon as
  the application starts it, and the body when it comes: two writes, two TCP segments, for
  every request. Profiled under `energy-ingest bench http-single`, those writes were the
  largest single cost of the event loop (BENCHMARKS.md). Here the writes made during one
  turn of the event loop leave in one.
- **Timeouts.** A connection has HTTP_HEADER_TIMEOUT_S to send a request's headers (from
  its first byte, or from its opening: a connection that never sends a byte is closed too)
  and HTTP_BODY_TIMEOUT_S for the body; past them it gets `408` and is closed. Idle
  keep-alive connections are closed by uvicorn after HTTP_KEEPALIVE_S.
- **A bound on connections.** Past HTTP_MAX_CONNECTIONS open connections, the oldest idle one
  is closed for each new one (idle: between requests, or not a byte sent yet); with none
  idle, the new one is answered `503`. Held-open connections cannot use up the process's file
  descriptors, and a probe of /health always gets in.
- **Closing without losing the answer.** When a request's body is refused before it is read
  whole (`413`), closing at once would make the kernel reset the connection, and a client
  still writing its body would never read the answer. The connection is half-closed after
  the answer and what the client still sends is read and thrown away (up to
  LINGER_MAX_BYTES, for LINGER_S at most), then it is closed.

The step past uvicorn's public interface (its httptools protocol is subclassed) carries a
version bound on uvicorn in pyproject.toml and tests of each behaviour
(tests/test_protocol.py, tests/test_http_abuse.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

LINGER_S = 5.0
LINGER_MAX_BYTES = 64 * 1024 * 1024
TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: 47\r\n\r\n"
    b'{"detail":"the request did not arrive in time"}'
)
BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: 51\r\n\r\n"
    b'{"detail":"too many connections; try again shortly"}'
)


@dataclass(slots=True)
class ConnectionLimits:
    """One per server: the settings, and the idle connections, oldest first."""

    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    idle: OrderedDict[HttpProtocol, None] = field(default_factory=OrderedDict)
    open: set[Any] = field(default_factory=set)  # uvicorn's own set, once known
    evicted: int = 0
    timed_out: int = 0


class _CoalescingTransport:
    """A transport whose `write`s are joined until the end of the loop's current turn, and
    whose `close` leaves the protocol to decide how (at once, or lingering)."""

    def __init__(self, transport: asyncio.Transport, protocol: HttpProtocol | None = None) -> None:
        self._transport = transport
        self._protocol = protocol
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()  # what was written goes out before the connection closes
        if self._protocol is not None and self._protocol.linger():
            return
        self._transport.close()

    def is_closing(self) -> bool:
        lingering = self._protocol is not None and self._protocol.lingering
        return lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    # Set by `with_limits` for a server: uvicorn makes one instance per connection itself.
    server_limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = self.server_limits
        self.lingering = False
        self._lingered_bytes = 0
        self._message_complete = True
        self._timer: asyncio.TimerHandle | None = None
        self._raw: asyncio.Transport | None = None

    # -- connections --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.limits.open = self.connections
        self._raw = transport
        # (Flow control keeps the real transport: pausing reading is not delayed.)
        self.transport = cast(asyncio.Transport, _CoalescingTransport(transport, self))
        self._arm(self.limits.header_timeout_s)
        if len(self.connections) > self.limits.max_connections and not self._evict_one():
            transport.write(BUSY_ANSWER)
            transport.close()
            return
        self.limits.idle[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.limits.idle.pop(self, None)
        super().connection_lost(exc)

    def _evict_one(self) -> bool:
        """Close the oldest idle connection to make room; False if none is idle."""
        while self.limits.idle:
            oldest, _ = self.limits.idle.popitem(last=False)
            if oldest is not self and oldest._raw is not None and not oldest._raw.is_closing():
                oldest._raw.close()
                self.limits.evicted += 1
                if self.limits.evicted in (1, 100) or self.limits.evicted % 10_000 == 0:
                    log.warning(
                        "HTTP: %d connections open (HTTP_MAX_CONNECTIONS): closing idle ones "
                        "(%d so far)",
                        len(self.connections),
                        self.limits.evicted,
                    )
                return True
        return False

    # -- one request ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # what a refused body still brings: read and thrown away
            self._lingered_bytes += len(data)
            if self._lingered_bytes > LINGER_MAX_BYTES and self._raw is not None:
                self._raw.close()
            return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_complete = False
        self.limits.idle.pop(self, None)
        if self._timer is None:
            self._arm(self.limits.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._arm(self.limits.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._message_complete = True
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.limits.idle[self] = None  # (moved to the end: the newest idle)

    # -- timeouts -----------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        raw = self._raw
        if raw is None or raw.is_closing():
            return
        self.limits.timed_out += 1
        if self.cycle is None or not self.cycle.response_started:
            raw.write(TIMEOUT_ANSWER)
        if self.cycle is not None:
            self.cycle.disconnected = True  # the application stops waiting for its body
            self.cycle.message_event.set()
        raw.close()

    # -- lingering close ----------------------------------------------------------------

    def linger(self) -> bool:
        """Asked when uvicorn closes: True if the close is delayed (the request's body was
        not read whole, and the client may still be writing it)."""
        raw = self._raw
        if self.lingering or self._message_complete or raw is None or raw.is_closing():
            return self.lingering
        if not raw.can_write_eof():
            return False
        self.lingering = True
        self._disarm()
        self.limits.idle.pop(self, None)
        raw.write_eof()  # the answer, then end of stream: the client reads it and stops
        self._timer = self.loop.call_later(LINGER_S, raw.close)
        self.flow.resume_reading()
        return True

    def eof_received(self) -> None:
        if self.lingering and self._raw is not None:
            self._raw.close()


def with_limits(limits: ConnectionLimits) -> type[HttpProtocol]:
    """The protocol class for one server (uvicorn's `http=`), with its limits."""
    return type("HttpProtocolWithLimits", (HttpProtocol,), {"server_limits": limits})
