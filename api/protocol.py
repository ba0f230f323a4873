"""uvicorn's HTTP protocol (httptools), with the writes of one answer sent together.

uvicorn writes an answer's status line and headers as soon as the application starts it,
and the body when it comes: two writes, two TCP segments, for every request. Profiled under
`energy-ingest bench http-single`, those writes were the largest single cost of the event
loop (BENCHMARKS.md). Here the writes made during one turn of the event loop leave in one.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _CoalescingTransport:
    """A transport whose `write`s are joined until the end of the loop's current turn."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
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
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # (Flow control keeps the real transport: pausing reading is not delayed.)
        self.transport = cast(asyncio.Transport, _CoalescingTransport(transport))
