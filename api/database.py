"""A pooled connection for a route, with database failures turned into HTTP answers:
unreachable or failing → 503 with Retry-After; a value PostgreSQL refuses → 400."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from api.responses import ApiError, unavailable
from daemon.runtime import Runtime
from db.errors import DataFailure, classify

log = logging.getLogger(__name__)

ACQUIRE_TIMEOUT_S = 5.0


@asynccontextmanager
async def connection(runtime: Runtime) -> AsyncIterator[asyncpg.Connection]:
    try:
        async with runtime.pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            yield conn
    except ApiError:
        raise
    except Exception as error:
        # The caller is told what to do in words; PostgreSQL's own text stays in the log.
        failure = classify(error)
        log.warning("a read failed: %s", failure.detail)
        if isinstance(failure, DataFailure):
            raise ApiError(
                400, [{"field": "", "message": "the database refused a value of this request"}]
            ) from error
        raise unavailable(f"database unavailable ({failure.cause}); try again") from error
