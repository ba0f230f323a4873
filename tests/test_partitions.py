"""Daily partitions: created ahead, dropped past retention, one daemon at a time."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import asyncpg

from db.partitions import (
    days_to_keep,
    first_day,
    month_partition_name,
    next_month,
    partition_day,
    partition_end,
    partition_name,
    rollup_first_day,
    upkeep,
)

NOW = datetime(2026, 11, 25, 10, 30, tzinfo=UTC)


def test_days_to_keep_run_from_retention_through_lookahead() -> None:
    days = days_to_keep(NOW, retention_days=2, lookahead_days=3)
    assert days[0] == date(2026, 11, 23) and days[-1] == date(2026, 11, 28)
    assert len(days) == 6


def test_partition_names_round_trip() -> None:
    name = partition_name("meter_readings", date(2026, 1, 9))
    assert name == "meter_readings_p20260109"
    assert partition_day(name) == date(2026, 1, 9)
    assert partition_day("meter_readings") is None
    month = month_partition_name("meter_hourly", date(2026, 12, 1))
    assert month == "meter_hourly_m202612" and partition_day(month) is None
    assert partition_end(month) == date(2027, 1, 1)
    assert partition_end(name) == date(2026, 1, 10)
    assert next_month(date(2026, 1, 31)) == date(2026, 2, 1)


async def partitions(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = $1::regclass ORDER BY 1",
        table,
    )
    return [r["relname"] for r in rows]


async def test_upkeep_creates_ahead_and_drops_past_retention(conn: asyncpg.Connection) -> None:
    later = datetime.now(UTC) + timedelta(days=40)
    report = await upkeep(conn, schema="public", now=later, retention_days=30, lookahead_days=3)
    assert partition_name("meter_readings", later.date() + timedelta(days=3)) in report.created
    names = await partitions(conn, "meter_readings")
    first_kept = (later - timedelta(days=30)).date()
    assert all(partition_day(n) >= first_kept for n in names)  # type: ignore[operator]
    assert partition_name("meter_readings", datetime.now(UTC).date()) in report.dropped


async def test_two_upkeeps_at_once_do_not_collide(db_url: str) -> None:
    later = datetime.now(UTC) + timedelta(days=10)
    conns = [await asyncpg.connect(db_url) for _ in range(2)]
    try:
        reports = await asyncio.gather(
            *(
                upkeep(c, schema="public", now=later, retention_days=30, lookahead_days=3)
                for c in conns
            )
        )
        created = [name for report in reports for name in report.created]
        assert len(created) == len(set(created)) > 0
        again = await upkeep(
            conns[0], schema="public", now=later, retention_days=30, lookahead_days=3
        )
        assert again.created == [] and again.dropped == []
    finally:
        for c in conns:
            await c.close()


ROLLUP_DAYS = 200


async def roll_ups(conn: asyncpg.Connection) -> list[tuple[str, datetime, float, int]]:
    rows = await conn.fetch(
        "SELECT meter_id, hour, kwh_consumed_ac, readings FROM meter_hourly ORDER BY 1, 2"
    )
    return [tuple(r) for r in rows]


async def keep_up(conn: asyncpg.Connection, now: datetime, retention_days: int = 30) -> list[str]:
    """Upkeep at `now` until it has no month left to merge; the months it merged."""
    merged: list[str] = []
    while True:
        report = await upkeep(
            conn,
            schema="public",
            now=now,
            retention_days=retention_days,
            lookahead_days=3,
            rollup_retention_days=ROLLUP_DAYS,
        )
        merged += report.merged
        if not report.merged:
            return merged


async def test_old_roll_ups_are_merged_into_months_then_dropped_whole(
    conn: asyncpg.Connection, db_url: str
) -> None:
    """Months of roll-ups past the raw history become one partition each, with every row
    they held; raising the raw retention afterwards still works; a month goes once all of
    it is past ROLLUP_RETENTION_DAYS."""
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    merged: list[str] = []
    for step in range(0, 190, 10):  # a daemon running half a year, a roll-up row an hour a day
        now = start + timedelta(days=step)
        merged += await keep_up(conn, now)
        await conn.executemany(
            "INSERT INTO meter_hourly VALUES ($1, $2, $3, 1)",
            [
                (f"M{m}", now + timedelta(days=d - 7, hours=m), float(step * 100 + d * 10 + m))
                for d in range(10)
                for m in range(3)
            ],
        )
    stored = await roll_ups(conn)
    now = start + timedelta(days=190)
    merged += await keep_up(conn, now)
    assert await roll_ups(conn) == stored
    names = await partitions(conn, "meter_hourly")
    raw_from = first_day(now, 30)
    months = [n for n in names if partition_day(n) is None]
    assert months == sorted(n for n in merged if n.startswith("meter_"))
    for name in names:  # every day of a month wholly before the raw history is merged
        day = partition_day(name)
        assert day is None or next_month(day) > raw_from, name
    # Days stay days for the raw history, its look-ahead, and its first month's days before it.
    assert len(names) - len(months) <= 30 + 3 + 1 + 30
    assert len(months) >= 4

    raised = await keep_up(conn, now, retention_days=120)  # (no day made inside a month)
    assert raised == [] and await roll_ups(conn) == stored

    # A read holding the month's oldest day (an operator's, say) past the 5 s lock timeout:
    # the merge waits for the next upkeep, the days ahead are made all the same.
    later = now + timedelta(days=75)
    days = {d: n for n in await partitions(conn, "meter_hourly") if (d := partition_day(n))}
    oldest_day = days[min(days)]
    assert next_month(min(days)) <= first_day(later, 30)
    reader = await asyncpg.connect(db_url)  # (conn's database)
    try:
        async with reader.transaction():
            await reader.execute(f'SELECT count(*) FROM "{oldest_day}"')
            report = await upkeep(
                conn,
                schema="public",
                now=later,
                retention_days=30,
                lookahead_days=3,
                rollup_retention_days=ROLLUP_DAYS,
            )
    finally:
        await reader.close()
    assert not any(n.startswith("meter_") for n in report.merged) and report.created
    assert oldest_day in await partitions(conn, "meter_hourly")
    await keep_up(conn, later)
    kept_from = rollup_first_day(later, 30, ROLLUP_DAYS)
    for name in await partitions(conn, "meter_hourly"):
        assert partition_end(name) > kept_from, name  # type: ignore[operator]
    kept = datetime(kept_from.year, kept_from.month, 1, tzinfo=UTC)
    assert await roll_ups(conn) == [r for r in stored if r[1] >= kept]
    assert any(r[1] < datetime.combine(kept_from, datetime.min.time(), UTC) for r in stored)
