"""Daily partitions of the history tables: created ahead of need, dropped past retention.

Every daemon runs the upkeep; a transaction-scoped advisory lock makes one do the work at a
time, and `lock_timeout` keeps a DROP from stalling writers behind it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg

from db.migrate import lock_key, migrate
from db.tables import PARTITIONED, REJECTIONS

log = logging.getLogger(__name__)

_SUFFIX = re.compile(r"_p(\d{8})$")

LIST_PARTITIONS = """
SELECT c.relname
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_class p ON p.oid = i.inhparent
JOIN pg_namespace n ON n.oid = p.relnamespace
WHERE p.relname = $1 AND n.nspname = current_schema()
"""


@dataclass(frozen=True, slots=True)
class UpkeepReport:
    created: list[str]
    dropped: list[str]


def partition_name(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def partition_day(name: str) -> date | None:
    match = _SUFFIX.search(name)
    return datetime.strptime(match[1], "%Y%m%d").date() if match else None


def days_to_keep(now: datetime, *, retention_days: int, lookahead_days: int) -> list[date]:
    """The first day that can still hold a valid reading, through the look-ahead."""
    today = now.astimezone(UTC).date()
    first = (now - timedelta(days=retention_days)).astimezone(UTC).date()
    return [first + timedelta(days=n) for n in range((today - first).days + lookahead_days + 1)]


async def upkeep(
    conn: asyncpg.Connection,
    *,
    schema: str,
    now: datetime,
    retention_days: int,
    lookahead_days: int,
) -> UpkeepReport:
    wanted = days_to_keep(now, retention_days=retention_days, lookahead_days=lookahead_days)
    created: list[str] = []
    dropped: list[str] = []
    async with conn.transaction():
        got_lock = await conn.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtext($1))", lock_key(schema, "partitions")
        )
        if not got_lock:
            return UpkeepReport([], [])  # another daemon is at it
        await conn.execute("SET LOCAL lock_timeout = '5s'")
        for table, storage in PARTITIONED.items():
            existing = {r["relname"] for r in await conn.fetch(LIST_PARTITIONS, table)}
            for day in wanted:
                name = partition_name(table, day)
                if name in existing:
                    continue
                await conn.execute(
                    f'CREATE TABLE "{name}" PARTITION OF "{table}" '
                    f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') "
                    f"TO ('{(day + timedelta(days=1)).isoformat()} 00:00:00+00'){storage}"
                )
                created.append(name)
            for name in sorted(existing):
                old = partition_day(name)
                if old is not None and old < wanted[0]:
                    await conn.execute(f'DROP TABLE "{name}"')
                    dropped.append(name)
        await conn.execute(
            f"DELETE FROM {REJECTIONS} WHERE received_at < $1",
            now - timedelta(days=retention_days),
        )
    if created or dropped:
        log.info(
            "partitions: created %d (up to %s), dropped %d (%s)",
            len(created),
            created[-1] if created else "-",
            len(dropped),
            ", ".join(dropped) or "-",
        )
    return UpkeepReport(created, dropped)


async def prepare_schema(
    conn: asyncpg.Connection,
    *,
    schema: str,
    retention_days: int,
    lookahead_days: int,
    now: datetime | None = None,
) -> None:
    """Migrations, then the partitions they need: what precedes any write (the daemon's
    start, `energy-ingest migrate`, the benchmarks' and the tests' databases)."""
    await migrate(conn, schema=schema)
    await upkeep(
        conn,
        schema=schema,
        now=now or datetime.now(UTC),
        retention_days=retention_days,
        lookahead_days=lookahead_days,
    )
