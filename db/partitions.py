"""Daily partitions of the history tables and their hourly roll-ups: created ahead of need,
dropped past their retentions.

The raw history is kept RETENTION_DAYS, the roll-ups ROLLUP_RETENTION_DAYS (never less than
the raw history: analytics read the roll-ups for the whole hours of any window). Both are
created together, day by day; a roll-up partition outlives its day's history. With an
archive, a raw partition past retention is not dropped here: it is listed (`expired`) for
`db.archive` to export, verify and drop.

Once a whole month is older than the raw history, no reading can change its roll-ups any
more, and its day partitions are merged into one (`…_mYYYYMM`), a month a run: two years of
roll-ups are then about 25 partitions a table, not 730. The prepared statements of operators'
reads run generic plans, and PostgreSQL locks every partition of a generic plan when it runs
(pruned or not): 730 of them made one vehicle's analytics 2.2 times as slow (BENCHMARKS.md).
A merged month is dropped whole once all of it is past ROLLUP_RETENTION_DAYS.

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
_MONTH_SUFFIX = re.compile(r"_m(\d{6})$")

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
    merged: list[str] = field(default_factory=list)  # roll-up months made of day partitions


def partition_name(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def partition_day(name: str) -> date | None:
    match = _SUFFIX.search(name)
    return datetime.strptime(match[1], "%Y%m%d").date() if match else None


def month_partition_name(table: str, month: date) -> str:
    return f"{table}_m{month:%Y%m}"


def next_month(day: date) -> date:
    """The first day of the month after `day`'s."""
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def partition_end(name: str) -> date | None:
    """The first day after what a partition holds: its day's or its month's."""
    day = partition_day(name)
    if day is not None:
        return day + timedelta(days=1)
    match = _MONTH_SUFFIX.search(name)
    return next_month(datetime.strptime(match[1], "%Y%m").date()) if match else None


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
    dropped; then a month of roll-ups merged (whose failure never keeps a day from being
    made). A transaction for each table: one holds the lock of one parent at most, and so
    cannot deadlock with a read that locks the parents in another order."""
    wanted = days_to_keep(now, retention_days=retention_days, lookahead_days=lookahead_days)
    rollups_from = rollup_first_day(now, retention_days, rollup_retention_days)
    oldest = {table: wanted[0] if table in HISTORIES else rollups_from for table in PARTITIONED}
    report = UpkeepReport([], [], [])
    for table in PARTITIONED:
        async with conn.transaction():
            if not await _alone(conn, schema):
                return report  # another daemon is at it
            await _upkeep_table(conn, table, wanted, oldest[table], archive, report)
    await conn.execute(
        f"DELETE FROM {REJECTIONS} WHERE received_at < $1", now - timedelta(days=retention_days)
    )
    for table in PARTITIONED:
        if table not in HISTORIES:
            await _merge_a_month(conn, schema, table, wanted[0], report)
    created, dropped = report.created, report.dropped
    if created or dropped or report.merged:
        log.info(
            "partitions: created %d (up to %s), dropped %d (%s), merged %s",
            len(created),
            created[-1] if created else "-",
            len(dropped),
            ", ".join(dropped) or "-",
            ", ".join(report.merged) or "-",
        )
    return report


async def _alone(conn: asyncpg.Connection, schema: str) -> bool:
    """This transaction holds the schema's upkeep lock (no other daemon's upkeep runs), and
    gives up on a table lock after 5 s rather than stall writers queued behind it."""
    if not await conn.fetchval(
        "SELECT pg_try_advisory_xact_lock(hashtext($1))", lock_key(schema, "partitions")
    ):
        return False
    await conn.execute("SET LOCAL lock_timeout = '5s'")
    return True


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
        if name in existing or month_partition_name(table, day.replace(day=1)) in existing:
            continue  # (a month merged: RETENTION_DAYS was raised since)
        await conn.execute(
            f'CREATE TABLE "{name}" PARTITION OF "{table}" '
            f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') "
            f"TO ('{(day + timedelta(days=1)).isoformat()} 00:00:00+00'){PARTITIONED[table]}"
        )
        report.created.append(name)
    for name in sorted(existing):
        end = partition_end(name)
        if end is None or end > oldest:
            continue
        if archive and table in HISTORIES:  # (db.archive drops it once exported)
            report.expired.append(name)
        else:
            await drop_partition(conn, table, name)
            report.dropped.append(name)


async def drop_partition(conn: asyncpg.Connection, parent: str, name: str) -> None:
    """A partition dropped, the lock its DROP takes on the parent taken first. DROP alone
    locks the partition, then the parent; a read's plan locks the parent, then every
    partition: each would hold what the other waits for (a deadlock PostgreSQL ends by
    failing one). (`ONLY`: the parent itself, not each of its partitions.)"""
    await conn.execute(f'LOCK TABLE ONLY "{parent}" IN ACCESS EXCLUSIVE MODE')
    await conn.execute(f'DROP TABLE "{name}"')


async def _merge_a_month(
    conn: asyncpg.Connection, schema: str, table: str, before: date, report: UpkeepReport
) -> None:
    """The oldest month of roll-ups wholly before `before` (the raw history's first day)
    that is still in day partitions, made one partition. Its rows are copied, indexed and
    checked against the month's bounds in a table of its own first; the parent is locked
    only to swap the days for the month (DROP, ATTACH: no scan, no index to build). If that
    fails (a lock not granted within 5 s, say), all of it is tried again at the next
    upkeep."""
    try:
        async with conn.transaction():
            merged = await _alone(conn, schema) and await _merge(conn, table, before)
    except asyncpg.PostgresError as error:
        log.warning(
            "merging a month of %s failed (tried again at the next upkeep): %s", table, error
        )
        return
    if merged:
        report.merged.append(merged)


async def _merge(conn: asyncpg.Connection, table: str, before: date) -> str | None:
    names = [r["relname"] for r in await conn.fetch(LIST_PARTITIONS, table)]
    days = {day: name for name in names if (day := partition_day(name)) is not None}
    months = sorted({d.replace(day=1) for d in days if next_month(d) <= before})
    if not months:
        return None
    month, end = months[0], next_month(months[0])
    parts = [part for day, part in sorted(days.items()) if month <= day < end]
    name = month_partition_name(table, month)
    lo, hi = f"'{month.isoformat()} 00:00:00+00'", f"'{end.isoformat()} 00:00:00+00'"
    await conn.execute(f'CREATE TABLE "{name}" (LIKE "{table}" INCLUDING ALL)')
    rows = " UNION ALL ".join(f'SELECT * FROM "{part}"' for part in parts)
    await conn.execute(f'INSERT INTO "{name}" {rows}')
    await conn.execute(
        f'ALTER TABLE "{name}" ADD CONSTRAINT "{name}_bounds" CHECK (hour >= {lo} AND hour < {hi})'
    )
    for part in parts:
        await drop_partition(conn, table, part)
    await conn.execute(
        f'ALTER TABLE "{table}" ATTACH PARTITION "{name}" FOR VALUES FROM ({lo}) TO ({hi})'
    )
    await conn.execute(f'ALTER TABLE "{name}" DROP CONSTRAINT "{name}_bounds"')
    return name


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
