"""The database before the daemon writes: waiting for PostgreSQL, migrations and partitions,
and the health probes of the primary and of the replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import asyncpg

from db.errors import DATABASE_ERRORS, classify, setup_problem
from db.partitions import prepare_schema
from db.pool import TRANSACTION, check_schema, connect
from db.probe import DatabaseProbe, DatabaseStatus
from ingest.config import Settings

log = logging.getLogger(__name__)

DB_WAIT_LOG_EVERY_S = 10.0
# (A hint only, for a message PostgreSQL itself never sends: a pooler refusing `search_path`.)
POOLER_HINT = " (behind a pooler in transaction mode? set DB_POOLER=transaction)"


async def prepare_database(settings: Settings, database_url: str) -> None:
    """Apply migrations and create partitions; waits (logging) while PostgreSQL is down.
    Raises DatabaseSetupError for what waiting cannot mend (a password, a database that
    does not exist, a missing permission)."""
    conn = await _first_connection(settings, database_url)
    try:
        await prepare_schema(
            conn,
            schema=settings.db_schema,
            retention_days=settings.retention_days,
            lookahead_days=settings.partition_lookahead_days,
            rollup_retention_days=settings.rollup_retention_days,
            archive=settings.archive_dir is not None,  # (housekeeping exports, then drops)
        )
        if settings.db_pooler == TRANSACTION:
            await check_schema(conn, settings.db_schema)
    except asyncpg.PostgresError as error:
        problem = setup_problem(error)
        if problem is not None:
            raise problem from error
        raise
    finally:
        await conn.close()


async def _first_connection(settings: Settings, database_url: str) -> asyncpg.Connection:
    waited = 0.0
    while True:
        try:
            return await connect(database_url, schema=settings.db_schema, pooler=settings.db_pooler)
        except DATABASE_ERRORS as error:
            problem = setup_problem(error)
            if problem is not None:
                raise problem from error
            if waited % DB_WAIT_LOG_EVERY_S < 1:
                hint = POOLER_HINT if "startup parameter" in str(error) else ""
                log.warning(
                    "waiting for PostgreSQL at %s: %s%s",
                    _safe(database_url),
                    error,
                    hint,
                    extra=classify(error).log_fields,
                )
            await asyncio.sleep(1)
            waited += 1


def _safe(url: str) -> str:
    """The URL without its secrets, for the log: no user and password, no `password=`."""
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url.split("@")[-1])


@dataclass(frozen=True, slots=True)
class Probes:
    primary: DatabaseProbe
    replica: DatabaseProbe | None

    def replica_status(self) -> DatabaseStatus | None:
        """The replica's last answer; None when reads go to the primary."""
        return self.replica.status if self.replica is not None else None


@contextlib.asynccontextmanager
async def database_probes(settings: Settings, database_url: str) -> AsyncIterator[Probes]:
    """The primary's health probe, and the replica's when reads go to one."""
    schema, pooler = settings.db_schema, settings.db_pooler
    async with AsyncExitStack() as stack:
        primary = await stack.enter_async_context(
            DatabaseProbe(database_url, schema=schema, pooler=pooler)
        )
        replica = None
        if settings.database_read_url:
            replica = await stack.enter_async_context(
                DatabaseProbe(
                    settings.database_read_url, schema=schema, pooler=pooler, replica=True
                )
            )
        yield Probes(primary, replica)
