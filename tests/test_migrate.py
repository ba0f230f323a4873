"""Migrations: versioned, idempotent, safe from two processes at once."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta

import asyncpg

from daemon.services import EmbeddedPostgres
from db.migrate import available_migrations, migrate
from tests.conftest import fresh_database
from tests.services import REPO
from tests.streams import assert_rollups_match_history

SPEC_TABLES = {
    "meter_readings": ["meter_id", "ts", "kwh_consumed_ac", "voltage", "received_at"],
    "vehicle_readings": [
        "vehicle_id",
        "ts",
        "soc",
        "kwh_delivered_dc",
        "battery_temp",
        "received_at",
    ],
    "meter_latest": ["meter_id", "ts", "kwh_consumed_ac", "voltage", "received_at"],
    "vehicle_latest": [
        "vehicle_id",
        "ts",
        "soc",
        "kwh_delivered_dc",
        "battery_temp",
        "received_at",
    ],
    "charging_sessions": ["vehicle_id", "meter_id", "started_at", "ended_at"],
    "rejections": ["received_at", "source", "topic_or_route", "payload", "reason"],
}


async def run_cli(url: str, *args: str) -> tuple[int, str]:
    """`energy-ingest ARGS` in a process of its own, against the database at `url`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        *args,
        cwd=REPO,
        env={**os.environ, "DATABASE_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


async def run_migrate_command(url: str) -> tuple[int, str]:
    return await run_cli(url, "migrate")


async def test_two_migrate_processes_at_once_both_succeed(postgres: EmbeddedPostgres) -> None:
    url = await fresh_database(postgres, migrated=False)
    results = await asyncio.gather(run_migrate_command(url), run_migrate_command(url))
    for code, output in results:
        assert code == 0, output
    conn = await asyncpg.connect(url)
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        assert versions == [m.version for m in available_migrations()]
    finally:
        await conn.close()


async def test_schema_has_the_tables_and_columns_of_the_contract(
    conn: asyncpg.Connection,
) -> None:
    for table, columns in SPEC_TABLES.items():
        found = {
            r["column_name"]
            for r in await conn.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'public' AND table_name = $1",
                table,
            )
        }
        assert set(columns) <= found, (table, set(columns) - found)


async def test_migrate_again_applies_nothing(conn: asyncpg.Connection) -> None:
    assert await migrate(conn, schema="public") == []


async def test_history_primary_key_leads_with_device_id(conn: asyncpg.Connection) -> None:
    for table, first in (("meter_readings", "meter_id"), ("vehicle_readings", "vehicle_id")):
        key = await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = $1::regclass AND contype = 'p'",
            table,
        )
        assert key.startswith(f"PRIMARY KEY ({first}, ts) INCLUDE ("), key


async def test_a_vehicle_has_at_most_one_open_session(conn: asyncpg.Connection) -> None:
    insert = "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at, ended_at) "
    await conn.execute(insert + "VALUES ('V1', 'M1', now() - interval '1 hour', NULL)")
    try:
        await conn.execute(insert + "VALUES ('V1', 'M2', now(), NULL)")
    except (asyncpg.UniqueViolationError, asyncpg.ExclusionViolationError):
        pass
    else:
        raise AssertionError("a second open session was accepted")


async def test_sessions_of_one_vehicle_never_overlap(conn: asyncpg.Connection) -> None:
    insert = "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at, ended_at) "
    await conn.execute(insert + "VALUES ('V1', 'M1', '2026-01-01T00:00Z', '2026-01-01T10:00Z')")
    await conn.execute(  # touching end to start is fine
        insert + "VALUES ('V1', 'M2', '2026-01-01T10:00Z', '2026-01-01T12:00Z')"
    )
    try:
        await conn.execute(insert + "VALUES ('V1', 'M3', '2026-01-01T09:00Z', '2026-01-01T11:00Z')")
    except asyncpg.ExclusionViolationError:
        pass
    else:
        raise AssertionError("an overlapping session was accepted")


async def test_latest_tables_leave_room_for_in_place_updates(conn: asyncpg.Connection) -> None:
    for table in ("meter_latest", "vehicle_latest"):
        options = await conn.fetchval("SELECT reloptions FROM pg_class WHERE relname = $1", table)
        assert options == ["fillfactor=50"], table


async def test_rebuild_rollups_counts_readings_imported_by_sql(postgres: EmbeddedPostgres) -> None:
    """Readings written into the history by SQL are not in the roll-ups until their hours
    are summed again with `energy-ingest rebuild-rollups`; hours outside the range stay."""
    url = await fresh_database(postgres)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO meter_readings (meter_id, ts, kwh_consumed_ac, voltage) "
            "SELECT 'M-' || d, date_trunc('hour', now()) - interval '3 hours' + t * interval "
            "'7 minutes', 0.5, 230 FROM generate_series(0, 30) t, generate_series(1, 3) d"
        )
        await conn.execute(
            "INSERT INTO vehicle_readings (vehicle_id, ts, soc, kwh_delivered_dc, battery_temp) "
            "SELECT 'V-1', date_trunc('hour', now()) - interval '2 hours' + t * interval "
            "'5 minutes', 50, 0.4, 20 FROM generate_series(0, 11) t"
        )
        assert await conn.fetchval("SELECT count(*) FROM meter_hourly") == 0
        hour = await conn.fetchval("SELECT date_trunc('hour', now()) - interval '3 hours'")
        start, end = hour.isoformat(), (hour + timedelta(hours=1)).isoformat()
        code, output = await run_cli(url, "rebuild-rollups", start, end)
        assert code == 0, output
        # Only the hour asked for: 9 readings a meter (minutes 0, 7, ... 56) in 3 meters.
        assert await conn.fetchval("SELECT sum(readings) FROM meter_hourly") == 27
        assert await conn.fetchval("SELECT count(*) FROM vehicle_hourly") == 0
        code, output = await run_cli(
            url, "rebuild-rollups", "2000-01-01T00:00:00Z", datetime.now(UTC).isoformat()
        )
        assert code == 0, output
        await assert_rollups_match_history(conn)
    finally:
        await conn.close()


async def test_rebuild_rollups_refuses_what_is_not_a_range(postgres: EmbeddedPostgres) -> None:
    url = await fresh_database(postgres)
    for args, said in (
        (("2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z"), "START must come before END"),
        (("2026-01-01T00:00:00", "2026-01-02T00:00:00Z"), "needs an offset"),
        (("yesterday", "2026-01-02T00:00:00Z"), "is not ISO 8601"),
        (("0001-01-01T00:00:00+01:00", "2026-01-02T00:00:00Z"), "outside the calendar"),
    ):
        code, output = await run_cli(url, "rebuild-rollups", *args)
        assert code != 0 and said in output, output
