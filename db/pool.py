"""The connection pool: every connection works in the configured schema."""

from __future__ import annotations

import asyncpg


async def create_pool(dsn: str, *, schema: str, max_size: int) -> asyncpg.Pool:
    # min_size=0: the daemon must start (and report 503 on /health) while PostgreSQL is down.
    return await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=max_size,
        command_timeout=60,
        server_settings={"search_path": schema, "application_name": "energy-ingest"},
    )


async def connect(dsn: str, *, schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        dsn, server_settings={"search_path": schema, "application_name": "energy-ingest"}
    )
