"""Daily partitions of the history tables and their hourly roll-ups: created ahead of need,
dropped past their retentions.

The raw history is kept RETENTION_DAYS, the roll-ups ROLLUP_RETENTION_DAYS (never less than
the raw history: analytics read the roll-ups for the whole hours of any window). Both are
created together, day by day; a roll-up partition outlives its day's history. With an
archive, a raw partition past retention is not dropped here: it is listed (`expired`) for
`db.archive` to export, verify and drop.

Every daemon runs the upkeep; a transaction-scoped advisory lock makes one do the work at a
time, and `lock_timeout` keeps a DROP from stalling writers behind it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import asyncpg

from db.migrate import lock_key, migrate
from db.tables import HISTORIES, PARTITIONED, REJECTIONS

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
    expired: list[str] = field(default_factory=list)  # raw partitions past retention, kept


def partition_name(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def partition_day(name: str) -> date | None:
    match = _SUFFIX.search(name)
    return datetime.strptime(match[1], "%Y%m%d").date() if match else None


def days_to_keep(now: datetime, *, retention_days: int, lookahead_days: int) -> list[date]:
    """The first day that can still hold a valid reading, through the look-ahead."""
    today = now.astimezone(UTC).date()
    first = first_day(now, retention_days)
    return [first + timedelta(days=n) for n in range((today - first).days + lookahead_days + 1)]


def first_day(now: datetime, retention_days: int) -> date:
    """The oldest day a retention of `retention_days` keeps (its partition's day)."""
    return (now - timedelta(days=retention_days)).astimezone(UTC).date()


def raw_history_start(now: datetime, retention_days: int) -> datetime:
    """Where the raw history kept begins: the oldest kept partition's first instant (UTC
    midnight). Before it, only the hourly roll-ups are left."""
    day = first_day(now, retention_days)
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def upkeep(
    conn: asyncpg.Connection,
    *,
    schema: str,
    now: datetime,
    retention_days: int,
    lookahead_days: int,
    rollup_retention_days: int | None = None,
    archive: bool = False,
) -> UpkeepReport:
    """Partitions from the retention's first day through the look-ahead; raw ones older
    dropped (or, with `archive`, listed as expired), roll-ups older than their own retention
    dropped."""
    wanted = days_to_keep(now, retention_days=retention_days, lookahead_days=lookahead_days)
    rollups_from = rollup_first_day(now, retention_days, rollup_retention_days)
    oldest = {table: wanted[0] if table in HISTORIES else rollups_from for table in PARTITIONED}
    report = UpkeepReport([], [], [])
    async with conn.transaction():
        got_lock = await conn.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtext($1))", lock_key(schema, "partitions")
        )
        if not got_lock:
            return report  # another daemon is at it
        await conn.execute("SET LOCAL lock_timeout = '5s'")
        for table in PARTITIONED:
            await _upkeep_table(conn, table, wanted, oldest[table], archive, report)
        await conn.execute(
            f"DELETE FROM {REJECTIONS} WHERE received_at < $1",
            now - timedelta(days=retention_days),
        )
    created, dropped = report.created, report.dropped
    if created or dropped:
        log.info(
            "partitions: created %d (up to %s), dropped %d (%s)",
            len(created),
            created[-1] if created else "-",
            len(dropped),
            ", ".join(dropped) or "-",
        )
    return report


async def _upkeep_table(
    conn: asyncpg.Connection,
    table: str,
    wanted: list[date],
    oldest: date,
    archive: bool,
    report: UpkeepReport,
) -> None:
    """One partitioned table's days: the wanted ones created, those before `oldest` dropped
    (or listed as expired: raw history to archive first)."""
    existing = {r["relname"] for r in await conn.fetch(LIST_PARTITIONS, table)}
    for day in wanted:
        name = partition_name(table, day)
        if name in existing:
            continue
        await conn.execute(
            f'CREATE TABLE "{name}" PARTITION OF "{table}" '
            f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') "
            f"TO ('{(day + timedelta(days=1)).isoformat()} 00:00:00+00'){PARTITIONED[table]}"
        )
        report.created.append(name)
    for name in sorted(existing):
        old = partition_day(name)
        if old is None or old >= oldest:
            continue
        if archive and table in HISTORIES:  # (db.archive drops it once exported)
            report.expired.append(name)
        else:
            await conn.execute(f'DROP TABLE "{name}"')
            report.dropped.append(name)


def rollup_first_day(now: datetime, retention_days: int, rollup_retention_days: int | None) -> date:
    """The oldest day whose roll-ups are kept: ROLLUP_RETENTION_DAYS, never less than the raw
    history's (unset: the raw history's alone, as before roll-ups outlived it)."""
    days = max(retention_days, rollup_retention_days or retention_days)
    return first_day(now, days)


async def prepare_schema(
    conn: asyncpg.Connection,
    *,
    schema: str,
    retention_days: int,
    lookahead_days: int,
    now: datetime | None = None,
    rollup_retention_days: int | None = None,
    archive: bool = False,
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
        rollup_retention_days=rollup_retention_days,
        archive=archive,
    )
