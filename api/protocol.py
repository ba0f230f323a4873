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
- **A bounded head.** A request line longer than HTTP_MAX_REQUEST_LINE_BYTES is answered
  `414`, more than HTTP_MAX_HEADERS headers or more than HTTP_MAX_HEADER_BYTES of them `431`,
  as soon as the limit is passed: while a request's head is open, the parser is fed at most
  what the limits leave, so a header line that never ends costs what the limits allow and
  no more (httptools joins a header's pieces by copying, a cost that grows with the square
  of its length: 64 MiB of one header held the event loop for seconds). A head the parser
  refuses is `400`. Each answer is JSON, and the connection is closed after it.
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

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Every line is about HTTP (its `transport` field with LOG_FORMAT=json).
log = logging.LoggerAdapter(logging.getLogger(__name__), {"transport": "http"})

LINGER_S = 5.0
LINGER_MAX_BYTES = 64 * 1024 * 1024
# Bytes of a head beyond the URL and the headers themselves: method, version, line ends,
# spaces around header values.
HEAD_SLACK_BYTES = 1024
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
URI_TOO_LONG, HEADERS_TOO_LARGE, BAD_REQUEST = 414, 431, 400
_REASONS = {
    URI_TOO_LONG: b"URI Too Long",
    HEADERS_TOO_LARGE: b"Request Header Fields Too Large",
    BAD_REQUEST: b"Bad Request",
}


def refusal(status: int, detail: str) -> bytes:
    """A whole answer refusing a request before it reached the application."""
    body = orjson.dumps({"detail": detail})
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
    )


@dataclass(slots=True)
class ConnectionLimits:
    """One per server: the settings, and the idle connections, oldest first."""

    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    max_request_line_bytes: int = 8192
    max_header_bytes: int = 32_768
    max_headers: int = 100
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
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            ended = self._protocol is not None and self._protocol.lingering  # (write_eof)
            if not ended and not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()  # what was written goes out before the connection closes
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
        # The head of the request being read: open from the end of the previous request
        # (or the connection's start) to the end of its headers.
        self._head_open = True
        self._head_bytes = 0
        self._line_bytes = 0
        self._header_count = 0
        self._header_bytes = 0
        self._refusal: int | None = None

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
        limits = self.limits
        head_limit = limits.max_request_line_bytes + limits.max_header_bytes + HEAD_SLACK_BYTES
        while data and self._head_open and self._refusal is None:
            room = head_limit - self._head_bytes
            if room <= 0:  # a head that does not end within the limits (a long URL is
                self._refusal = HEADERS_TOO_LARGE  # refused by on_url before this)
                break
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
        if self._refusal is not None:
            self._refuse()
        elif data:
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a head the parser refuses, as JSON like every other."""
        log.info("HTTP: %s", msg)
        self._refusal = BAD_REQUEST
        self._refuse()

    def _refuse(self) -> None:
        """Answer the refusal once, then close: lingering, so that a client still writing
        its head reads the answer rather than a reset. Requests before it on the connection
        (pipelined) are answered first, in order: the refusal waits for their answers."""
        raw = self._raw
        if raw is None or raw.is_closing() or self.lingering:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.more_body:
            # The refused bytes are this request's own body (a chunk size the parser
            # refuses): it never completes, so it is answered now, and the application
            # stops waiting for the rest (what it writes after is dropped).
            cycle.disconnected = True
            cycle.message_event.set()
        elif self._answers_owed():
            self.flow.pause_reading()  # (nothing more is read: the connection ends after)
            return  # on_response_complete comes back here
        if isinstance(self.transport, _CoalescingTransport):
            self.transport.flush()  # the last answer's bytes before the refusal's
        details = {
            URI_TOO_LONG: f"request line longer than {self.limits.max_request_line_bytes} "
            "bytes (HTTP_MAX_REQUEST_LINE_BYTES)",
            HEADERS_TOO_LARGE: f"request headers larger than {self.limits.max_header_bytes} "
            f"bytes, or more than {self.limits.max_headers} of them (HTTP_MAX_HEADER_BYTES, "
            "HTTP_MAX_HEADERS)",
            BAD_REQUEST: "malformed HTTP request",
        }
        status = self._refusal or BAD_REQUEST
        raw.write(refusal(status, details[status]))
        self._message_complete = False  # (so that the close lingers)
        self.lingering = False
        self._linger_now()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_complete = False
        self._line_bytes = self._header_count = self._header_bytes = 0
        self.limits.idle.pop(self, None)
        if self._timer is None:
            self._arm(self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self._line_bytes += len(url)
        if self._line_bytes > self.limits.max_request_line_bytes:
            self._refusal = self._refusal or URI_TOO_LONG
            return
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if (
            self._header_count > self.limits.max_headers
            or self._header_bytes > self.limits.max_header_bytes
        ):
            self._refusal = self._refusal or HEADERS_TOO_LARGE
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return  # never reaches the application: refused once the parser returns
        self._head_open = False
        self._arm(self.limits.body_timeout_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None:
            return
        self._message_complete = True
        self._head_open = True
        self._head_bytes = 0
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refusal is not None:
            self._refuse()  # (waiting for this answer, and any pipelined before it)
        elif not self.transport.is_closing():
            self.limits.idle[self] = None  # (moved to the end: the newest idle)

    def _answers_owed(self) -> bool:
        cycle = self.cycle
        return bool(self.pipeline) or (cycle is not None and not cycle.response_complete)

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
        return self._linger_now()

    def _linger_now(self) -> bool:
        raw = self._raw
        if raw is None or not raw.can_write_eof():
            if raw is not None:
                raw.close()
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
