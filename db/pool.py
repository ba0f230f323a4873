"""The connection pool: every connection works in the configured schema."""

from __future__ import annotations

import asyncpg


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset: the daemon's queries leave no session state behind (no SET, LISTEN,
    cursors or session advisory locks; migrations use a connection of their own), and
    asyncpg still rolls back a transaction left open. The default reset is one more round
    trip (`RESET ALL; UNLISTEN *; ...`) after every flush."""
    return None


async def create_pool(dsn: str, *, schema: str, max_size: int) -> asyncpg.Pool:
    # min_size=0: the daemon must start (and report 503 on /health) while PostgreSQL is down.
    return await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=max_size,
        command_timeout=60,
        reset=_keep_session,
        server_settings={"search_path": schema, "application_name": "energy-ingest"},
    )


async def connect(dsn: str, *, schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        dsn, server_settings={"search_path": schema, "application_name": "energy-ingest"}
    )
