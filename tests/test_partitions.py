"""Daily partitions: created ahead, dropped past retention, one daemon at a time."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import asyncpg

from db.partitions import days_to_keep, partition_day, partition_name, upkeep

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
