"""Connections to PostgreSQL: every one works in the configured schema, and says what it is
for (`application_name`: energy-ingest-write, -read, -control, -health), so that
`pg_stat_activity` tells the daemon's writes from its operators' reads.

Directly to PostgreSQL (or through a pooler in session mode) the schema is a startup
parameter, and asyncpg keeps its prepared statements. Through a pooler in *transaction* mode
(PgBouncer's `pool_mode = transaction`, what managed poolers run) a client's statements may
each run on another server connection: asyncpg's named prepared statements are off
(`statement_cache_size=0`), and the schema comes from the role's own `search_path` (the
pooler refuses it as a startup parameter), which the daemon checks at start. Nothing else of
the daemon keeps session state there: no SET, LISTEN or cursors, and only transaction-level
advisory locks (migrations, partition upkeep, links).

A multi-host URL (`postgresql://h1:5432,h2:5432/db?target_session_attrs=read-write`) is
asyncpg's (and libpq's): each new connection tries the hosts in order and keeps the first
that takes writes, so after a failover the next connection finds the new primary.
"""

from __future__ import annotations

from typing import Any, ClassVar

import asyncpg

SESSION, TRANSACTION = "none", "transaction"
APPLICATION = "energy-ingest"
# A host that does not answer (a failed primary's address) is given up on after this, and
# the next one tried: asyncpg's own default is a minute.
CONNECT_TIMEOUT_S = 10.0


def read_settings(statement_timeout_s: float | None) -> dict[str, str]:
    """What every operator's read runs with:

    - `statement_timeout`: PostgreSQL itself ends a read past ANALYTICS_STATEMENT_TIMEOUT_S,
      whatever the client does;
    - no JIT compilation: the fleet's statement passes `jit_above_cost` and spent 50-150 ms
      of a 200 ms answer compiling itself (BENCHMARKS.md, fleet);
    - the prepared statements' generic plans, whose partitions are pruned when they run.
      PostgreSQL's own choice compares the generic plan's cost, counted over *every*
      partition, with a plan made for the parameters, and so planned one vehicle's statement
      again at every call once a month of partitions existed: 2.5 ms a call with 30 days
      stored against 0.4 ms with one (BENCHMARKS.md, analytics).
    """
    settings = {"jit": "off", "plan_cache_mode": "force_generic_plan"}
    if statement_timeout_s is not None:
        settings["statement_timeout"] = f"{max(1, round(statement_timeout_s * 1000))}ms"
    return settings


class ReadConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection of the operators' read pool. Directly to PostgreSQL its session carries
    `settings` (startup parameters): a read costs no round trip for them. Through a
    transaction pooler a session cannot be set up (`in_session` is False): each read sets
    them in a transaction of its own (`db.analytics.read`)."""

    settings: ClassVar[dict[str, str]] = read_settings(None)
    in_session: ClassVar[bool] = False


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset: the daemon's queries leave no session state behind, and asyncpg
    still rolls back a transaction left open. The default reset is one more round trip
    (`RESET ALL; UNLISTEN *; ...`) after every flush."""
    return None


def _options(schema: str, pooler: str, purpose: str) -> dict[str, Any]:
    name = f"{APPLICATION}-{purpose}"
    if pooler == TRANSACTION:
        return {"statement_cache_size": 0, "server_settings": {"application_name": name}}
    return {"server_settings": {"search_path": schema, "application_name": name}}


async def create_pool(
    dsn: str,
    *,
    schema: str,
    max_size: int,
    pooler: str = SESSION,
    purpose: str = "write",
    read_timeout_s: float | None = None,
) -> asyncpg.Pool:
    """A pool of at most `max_size` connections for one purpose; with `read_timeout_s`, for
    operators' reads (`ReadConnection`s with that statement timeout)."""
    options = _options(schema, pooler, purpose)
    if read_timeout_s is not None:
        in_session = pooler != TRANSACTION
        settings = read_settings(read_timeout_s)
        options["connection_class"] = type(
            "ReadConnection", (ReadConnection,), {"settings": settings, "in_session": in_session}
        )
        if in_session:
            options["server_settings"].update(settings)
    # min_size=0: the daemon must start (and report 503 on /health) while PostgreSQL is down.
    return await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=max_size,
        command_timeout=60,
        timeout=CONNECT_TIMEOUT_S,
        reset=_keep_session,
        **options,
    )


async def connect(
    dsn: str, *, schema: str, pooler: str = SESSION, purpose: str = "control"
) -> asyncpg.Connection:
    options = _options(schema, pooler, purpose)
    return await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S, **options)


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
