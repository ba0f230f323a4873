"""Connections to PostgreSQL: every one works in the configured schema.

Directly to PostgreSQL (or through a pooler in session mode) the schema is a startup
parameter, and asyncpg keeps its prepared statements. Through a pooler in *transaction* mode
(PgBouncer's `pool_mode = transaction`, what managed poolers run) a client's statements may
each run on another server connection: asyncpg's named prepared statements are off
(`statement_cache_size=0`), and the schema comes from the role's own `search_path` (the
pooler refuses it as a startup parameter), which the daemon checks at start. Nothing else of
the daemon keeps session state: no SET, LISTEN or cursors, and only transaction-level
advisory locks (migrations, partition upkeep, links).
"""

from __future__ import annotations

from typing import Any

import asyncpg

SESSION, TRANSACTION = "none", "transaction"
APPLICATION = "energy-ingest"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset: the daemon's queries leave no session state behind, and asyncpg
    still rolls back a transaction left open. The default reset is one more round trip
    (`RESET ALL; UNLISTEN *; ...`) after every flush."""
    return None


def _options(schema: str, pooler: str) -> dict[str, Any]:
    if pooler == TRANSACTION:
        return {"statement_cache_size": 0, "server_settings": {"application_name": APPLICATION}}
    return {"server_settings": {"search_path": schema, "application_name": APPLICATION}}


async def create_pool(
    dsn: str, *, schema: str, max_size: int, pooler: str = SESSION
) -> asyncpg.Pool:
    # min_size=0: the daemon must start (and report 503 on /health) while PostgreSQL is down.
    return await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=max_size,
        command_timeout=60,
        reset=_keep_session,
        **_options(schema, pooler),
    )


async def connect(dsn: str, *, schema: str, pooler: str = SESSION) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, **_options(schema, pooler))


class WrongSchema(RuntimeError):
    """Through a transaction pooler, the role's search_path does not lead to DB_SCHEMA."""


async def check_schema(conn: asyncpg.Connection, schema: str) -> None:
    found = await conn.fetchval("SELECT current_schema()")
    if found != schema:
        raise WrongSchema(
            f"the connection works in schema {found!r}, not DB_SCHEMA {schema!r}: through a "
            f"transaction pooler the schema cannot be set per connection; give the role its "
            f"own: ALTER ROLE <user> SET search_path = {schema}"
        )
