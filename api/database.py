"""Connections for the routes, behind admission control, with database failures turned into
HTTP answers.

Operators' reads never take a connection of the write path: they have a pool of their own
(DB_READ_POOL_SIZE, on DATABASE_READ_URL when set), whose sessions carry a server-side
statement timeout (ANALYTICS_STATEMENT_TIMEOUT_S). Analytics (the fleet, one vehicle, a
series) also take a turn: at most ANALYTICS_MAX_CONCURRENT run at once. A read that gets
neither a turn nor a connection within READ_QUEUE_TIMEOUT_S is answered 503 with
Retry-After, never left waiting: what operators ask of PostgreSQL is bounded, whatever they
ask.

Failures in words: unreachable or failing → 503 with Retry-After; the statement timeout →
503 saying so; a value PostgreSQL refuses → 400.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from api.responses import ApiError, unavailable
from db.errors import DATABASE_ERRORS, DataFailure, classify
from ingest.metrics import Metrics

log = logging.getLogger(__name__)

STATEMENT_TIMEOUT = "57014"  # query_canceled: the statement timeout (or a cancel)


class ReadGate:
    """Admission control for operators' reads: turns for analytics, connections for all."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        analytics_max: int,
        queue_timeout_s: float,
        statement_timeout_s: float,
        metrics: Metrics,
    ) -> None:
        self.pool = pool
        self._turns = asyncio.Semaphore(analytics_max)
        self._analytics_max = analytics_max
        self._queue_timeout_s = queue_timeout_s
        self._statement_timeout_s = statement_timeout_s
        self._metrics = metrics

    @asynccontextmanager
    async def connection(self, *, analytics: bool) -> AsyncIterator[asyncpg.Connection]:
        """A read connection (after a turn, for analytics), or 503 after the queue timeout."""
        deadline = asyncio.get_running_loop().time() + self._queue_timeout_s
        if analytics:
            await self._take_turn(deadline)
        try:
            async with self._connected(deadline) as conn:
                yield conn
        finally:
            if analytics:
                self._turns.release()

    async def _take_turn(self, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await self._turns.acquire()
        except TimeoutError:
            self._metrics.reads_refused.labels("busy").inc()
            raise unavailable(
                f"{self._analytics_max} analytics requests are running "
                f"(ANALYTICS_MAX_CONCURRENT); try again shortly"
            ) from None

    @asynccontextmanager
    async def _connected(self, deadline: float) -> AsyncIterator[asyncpg.Connection]:
        remaining = max(0.001, deadline - asyncio.get_running_loop().time())
        try:
            conn = await self.pool.acquire(timeout=remaining)
        except TimeoutError:
            self._metrics.reads_refused.labels("busy").inc()
            raise unavailable(
                "every read connection is busy (DB_READ_POOL_SIZE); try again"
            ) from None
        except DATABASE_ERRORS as error:
            raise self._failed(error) from error
        self._metrics.reads_in_flight.inc()
        try:
            yield conn
        except DATABASE_ERRORS as error:  # (an error of ours goes on: a 500, logged)
            raise self._failed(error) from error
        finally:
            self._metrics.reads_in_flight.dec()
            await self.pool.release(conn)

    def _failed(self, error: BaseException) -> ApiError:
        # The caller is told what to do in words; PostgreSQL's own text stays in the log.
        failure = classify(error)
        if failure.sqlstate == STATEMENT_TIMEOUT:
            self._metrics.reads_refused.labels("statement_timeout").inc()
            log.info(
                "a read ran past ANALYTICS_STATEMENT_TIMEOUT_S: %s",
                failure.detail,
                extra=failure.log_fields,
            )
            return unavailable(
                f"the query ran longer than {self._statement_timeout_s:g} s "
                f"(ANALYTICS_STATEMENT_TIMEOUT_S): ask for a shorter window, or try later",
                retry_after_s=5,
            )
        log.warning("a read failed: %s", failure.detail, extra=failure.log_fields)
        if isinstance(failure, DataFailure):
            return ApiError(
                400, [{"field": "", "message": "the database refused a value of this request"}]
            )
        self._metrics.reads_refused.labels("database").inc()
        return unavailable(f"database unavailable ({failure.cause}); try again")


@asynccontextmanager
async def control_connection(
    pool: asyncpg.Pool, *, timeout_s: float
) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the primary's small control pool (links), 503 if none comes in time."""
    try:
        async with pool.acquire(timeout=timeout_s) as conn:
            yield conn
    except TimeoutError:
        raise unavailable("the database is busy; try again") from None
    except DATABASE_ERRORS as error:
        failure = classify(error)
        log.warning("a write of links failed: %s", failure.detail, extra=failure.log_fields)
        if isinstance(failure, DataFailure):
            raise ApiError(
                400, [{"field": "", "message": "the database refused a value of this request"}]
            ) from error
        raise unavailable(f"database unavailable ({failure.cause}); try again") from error
