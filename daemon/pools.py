"""The daemon's connections to PostgreSQL, one pool per purpose, so that no purpose waits
behind another:

- **write**: the flushes alone (FLUSH_CONCURRENCY transactions, and one for retrying held
  readings). No read can take one of these: operators asking for a heavy fleet never
  delay an acknowledgement.
- **read**: operators' reads (analytics, dashboard, status, rejections), DB_READ_POOL_SIZE
  connections with a server-side statement timeout, on DATABASE_READ_URL (a streaming
  replica) when set, else on the primary.
- **control**: the primary's small pool for the rest: links, partition upkeep, the bound on
  rejections.

(The health probe has a connection of its own, not a pool: `db.probe`.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import asyncpg

from db.pool import create_pool
from ingest.config import Settings

CONTROL_POOL_SIZE = 2
POOL_CLOSE_S = 1.0


@dataclass(frozen=True, slots=True)
class Pools:
    write: asyncpg.Pool
    read: asyncpg.Pool
    control: asyncpg.Pool


def write_pool_size(settings: Settings) -> int:
    """One connection per flush in flight, and one for the retry of held readings."""
    return settings.flush_concurrency + 1


@asynccontextmanager
async def database_pools(settings: Settings, database_url: str) -> AsyncIterator[Pools]:
    """The three pools, closed (in reverse) on exit."""
    schema, pooler = settings.db_schema, settings.db_pooler
    async with AsyncExitStack() as stack:
        write = await create_pool(
            database_url,
            schema=schema,
            max_size=write_pool_size(settings),
            pooler=pooler,
            purpose="write",
        )
        stack.push_async_callback(close_pool, write)
        read = await create_pool(
            settings.database_read_url or database_url,
            schema=schema,
            max_size=settings.db_read_pool_size,
            pooler=pooler,
            purpose="read",
            read_timeout_s=settings.analytics_statement_timeout_s,
        )
        stack.push_async_callback(close_pool, read)
        control = await create_pool(
            database_url,
            schema=schema,
            max_size=CONTROL_POOL_SIZE,
            pooler=pooler,
            purpose="control",
        )
        stack.push_async_callback(close_pool, control)
        yield Pools(write, read, control)


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close gracefully, or not at all: a connection stuck in a query (a lock held by
    someone else, a database that stopped answering) must not keep the process alive."""
    try:
        await asyncio.wait_for(pool.close(), POOL_CLOSE_S)
    except TimeoutError:
        pool.terminate()
