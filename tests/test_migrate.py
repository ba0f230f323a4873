"""Migrations: versioned, idempotent, safe from two processes at once."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from daemon.embedded import EmbeddedPostgres
from db.migrate import available_migrations, migrate
from tests.conftest import fresh_database
from tests.services import REPO

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


async def run_migrate_command(url: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        "migrate",
        cwd=REPO,
        env={**os.environ, "DATABASE_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


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
