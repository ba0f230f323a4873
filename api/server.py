"""The HTTP server as one of the daemon's parts: uvicorn (httptools) with bounded heads and
a bounded number of connections, started and stopped by the daemon rather than by signals.

Stopping has two steps, because HTTP callers wait for their readings' commit: `drain` stops
taking connections and lets the requests in progress finish (for HTTP_DRAIN_S at most,
while the writer still flushes), and leaving the `async with` block, after the writer has
committed what it held, ends whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import Iterator

import uvicorn

from api.app import App
from api.protocol import ConnectionLimits, with_limits
from ingest.config import Settings
from ingest.lifecycle import Component, Deadline
from ingest.metrics import Metrics

log = logging.getLogger(__name__)

HTTP_DRAIN_S = 2.0
HTTP_LAST_ANSWERS_S = 0.05  # for the answers the writer's last commit settled
FDS_KEPT = 256  # file descriptors not given to HTTP connections


class _QuietServer(uvicorn.Server):
    """uvicorn, minus its own signal handling: the daemon decides when HTTP stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer(Component):
    name = "http"

    def __init__(self, app: App, settings: Settings, metrics: Metrics) -> None:
        limits = connection_limits(settings)
        metrics.watch_http(limits)
        self._server = _QuietServer(
            uvicorn.Config(
                app,
                host=settings.http_host,
                port=settings.http_port,
                log_level="warning",
                log_config=None,  # uvicorn logs through the daemon's handler (LOG_FORMAT)
                lifespan="off",
                # Neither is used (no access log; client addresses are never looked at), and
                # both cost CPU on every request.
                access_log=False,
                proxy_headers=False,
                http=with_limits(limits),
                timeout_keep_alive=settings.http_keepalive_s,
            )
        )

    async def run(self) -> None:
        await self._server.serve()

    async def drain(self, deadline: Deadline) -> None:
        """Take no new connections; give the requests in progress up to HTTP_DRAIN_S (a third
        of the shutdown's time at most) to be answered."""
        self._server.should_exit = True
        if self.task is not None:
            limit = min(HTTP_DRAIN_S, deadline.seconds / 3, deadline.left())
            await asyncio.wait({self.task}, timeout=limit)

    async def finish(self, deadline: Deadline) -> None:
        self._server.should_exit = True
        if self.task is not None:
            await asyncio.wait({self.task}, timeout=min(HTTP_LAST_ANSWERS_S, deadline.left()))


def connection_limits(settings: Settings) -> ConnectionLimits:
    """HTTP_MAX_CONNECTIONS, within the file descriptors this process may open (raised to
    the hard limit first; some are kept for PostgreSQL, the broker and the log)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    cap = min(settings.http_max_connections, max(64, soft - FDS_KEPT))
    if cap < settings.http_max_connections:
        log.warning("HTTP: at most %d connections (open files limit %d)", cap, soft)
    return ConnectionLimits(
        header_timeout_s=settings.http_header_timeout_s,
        body_timeout_s=settings.http_body_timeout_s,
        max_connections=cap,
        max_request_line_bytes=settings.http_max_request_line_bytes,
        max_header_bytes=settings.http_max_header_bytes,
        max_headers=settings.http_max_headers,
    )
