"""A pooled connection for a route, with database failures turned into HTTP answers:
unreachable or failing → 503 with Retry-After; a value PostgreSQL refuses → 400."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from api.responses import ApiError, unavailable
from daemon.runtime import Runtime
from db.errors import DataFailure, classify

ACQUIRE_TIMEOUT_S = 5.0


@asynccontextmanager
async def connection(runtime: Runtime) -> AsyncIterator[asyncpg.Connection]:
    try:
        async with runtime.pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            yield conn
    except ApiError:
        raise
    except Exception as error:
        failure = classify(error)
        if isinstance(failure, DataFailure):
            raise ApiError(400, [{"field": "", "message": failure.detail}]) from error
        raise unavailable(f"database unavailable: {failure.detail}") from error
