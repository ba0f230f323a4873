"""Bytes per reading, in PostgreSQL and in the Parquet archive, on a loaded sample.

A private PostgreSQL; one whole UTC day of readings for METERS meters and as many vehicles, a
reading a minute each, loaded in SQL (generate_series, in time order as the daemon writes
them), with values of realistic precision and noise (kWh to 4 decimals, volts and degrees to
1, receive times a little after the reading's); the latest-state tables and the hourly
roll-ups filled from it; VACUUM ANALYZE. Then the sizes: each stream's day partition (heap,
its indexes), the latest tables, the roll-up partitions; and the archive's export of the same
partitions (`db.archive`, as the daemon runs it): file sizes, time, the process's peak memory
and the longest the event loop waited meanwhile. Extrapolated to the design point (20,000
meters and 20,000 vehicles, a reading a minute: 57.6 million rows a day).

    .venv/bin/python scripts/bytes_per_reading.py [--meters 2000] [--out docs/figures/...]

CPU-heavy (a few minutes on two cores): run it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import resource
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from daemon.services import EmbeddedPostgres
from db.archive import archive_partition
from db.partitions import partition_name, prepare_schema
from db.rollup import rebuild
from db.tables import METER, VEHICLE
from simulator.benchkit import scratch

DESIGN_DEVICES = 20_000  # per stream
MINUTES = 1440

LOAD_METERS = """
INSERT INTO meter_readings (meter_id, ts, kwh_consumed_ac, voltage, received_at)
SELECT 'meter-' || lpad(d::text, 6, '0'), t,
       round((0.02 + random() * 0.12)::numeric, 4)::float8,
       round((225 + random() * 10)::numeric, 1)::float8,
       t + random() * interval '2 seconds'
FROM generate_series($2::timestamptz, $3::timestamptz - interval '1 minute', '1 minute') t
CROSS JOIN generate_series(1, $1::int) d"""
LOAD_VEHICLES = """
INSERT INTO vehicle_readings (vehicle_id, ts, soc, kwh_delivered_dc, battery_temp, received_at)
SELECT 'vehicle-' || lpad(d::text, 6, '0'), t,
       round((20 + (extract(epoch FROM t)::bigint / 60 + d) % 80 + random())::numeric, 1)::float8,
       round((0.015 + random() * 0.1)::numeric, 4)::float8,
       round((15 + random() * 20)::numeric, 1)::float8,
       t + random() * interval '2 seconds'
FROM generate_series($2::timestamptz, $3::timestamptz - interval '1 minute', '1 minute') t
CROSS JOIN generate_series(1, $1::int) d"""
LATEST = """
INSERT INTO {latest} SELECT DISTINCT ON ({id}) * FROM {history} ORDER BY {id}, ts DESC"""
SIZES = """
SELECT pg_table_size($1::regclass) AS heap, pg_indexes_size($1::regclass) AS indexes,
       (SELECT count(*) FROM {table}) AS rows"""


async def sizes(conn: asyncpg.Connection, table: str) -> dict[str, int]:
    row = await conn.fetchrow(SIZES.format(table=f'"{table}"'), f'"{table}"')
    return {"heap_bytes": row["heap"], "index_bytes": row["indexes"], "rows": row["rows"]}


async def load(conn: asyncpg.Connection, devices: int, start: datetime) -> dict[str, float]:
    end = start + timedelta(days=1)
    began = time.perf_counter()
    await conn.execute(LOAD_METERS, devices, start, end)
    await conn.execute(LOAD_VEHICLES, devices, start, end)
    loaded = time.perf_counter()
    for t in (METER, VEHICLE):
        await conn.execute(LATEST.format(latest=t.latest, id=t.id_column, history=t.history))
    await rebuild(conn, start, end)
    await conn.execute("VACUUM ANALYZE")
    return {
        "load_s": round(loaded - began, 1),
        "latest_and_rollups_s": round(time.perf_counter() - loaded, 1),
    }


async def export(conn: asyncpg.Connection, day: datetime, folder: Path) -> dict[str, Any]:
    """Each stream's partition through the archive, with the event loop's longest wait."""
    longest = 0.0
    running = True

    async def ticker() -> None:
        nonlocal longest
        while running:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            longest = max(longest, time.perf_counter() - before - 0.01)

    tick = asyncio.create_task(ticker())
    out: dict[str, Any] = {}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for t in (METER, VEHICLE):
        began = time.perf_counter()
        done = await archive_partition(
            conn,
            schema="public",
            partition=partition_name(t.history, day.date()),
            archive_dir=folder,
        )
        assert done is not None
        seconds = time.perf_counter() - began
        out[t.stream] = {
            "rows": done.rows,
            "file_bytes": done.bytes,
            "bytes_per_reading": round(done.bytes / done.rows, 2),
            "export_s": round(seconds, 1),
            "rows_per_s": round(done.rows / seconds),
        }
    running = False
    await tick
    out["event_loop_longest_wait_ms"] = round(longest * 1000, 1)
    out["peak_rss_mib_before"] = round(rss_before / 1024, 1)
    out["peak_rss_mib_after"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def per_reading(stored: dict[str, Any], devices: int) -> dict[str, Any]:
    """Bytes per reading of each part, and the design point's day and retention."""
    readings = devices * MINUTES
    out: dict[str, Any] = {}
    for stream in ("meter", "vehicle"):
        s = stored[stream]
        history = s["history"]["heap_bytes"] + s["history"]["index_bytes"]
        rollup = s["rollup"]["heap_bytes"] + s["rollup"]["index_bytes"]
        latest = s["latest"]["heap_bytes"] + s["latest"]["index_bytes"]
        out[stream] = {
            "history_heap": round(s["history"]["heap_bytes"] / readings, 1),
            "history_indexes": round(s["history"]["index_bytes"] / readings, 1),
            "history_total": round(history / readings, 1),
            "rollups": round(rollup / readings, 2),
            "rollup_row_bytes": round(rollup / s["rollup"]["rows"], 1),
            "latest_per_device": round(latest / devices, 1),
            "parquet": s["parquet"]["bytes_per_reading"],
        }
    return out


def design_point(per: dict[str, Any]) -> dict[str, Any]:
    readings = DESIGN_DEVICES * MINUTES  # per stream and day
    day_history = sum(per[s]["history_total"] for s in per) * readings
    day_rollups = sum(per[s]["rollup_row_bytes"] for s in per) * DESIGN_DEVICES * 24
    day_parquet = sum(per[s]["parquet"] for s in per) * readings
    gb = 1e9
    return {
        "readings_per_day": 2 * readings,
        "history_gb_per_day": round(day_history / gb, 2),
        "history_gb_30_days": round(30 * day_history / gb, 1),
        "rollups_gb_per_day": round(day_rollups / gb, 3),
        "rollups_gb_730_days": round(730 * day_rollups / gb, 1),
        "latest_mb": round(sum(per[s]["latest_per_device"] for s in per) * DESIGN_DEVICES / 1e6, 1),
        "parquet_gb_per_day": round(day_parquet / gb, 2),
        "parquet_gb_per_year": round(365 * day_parquet / gb, 1),
    }


async def measure(dsn: str, devices: int, folder: Path) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        now = datetime.now(UTC)
        await prepare_schema(conn, schema="public", retention_days=3, lookahead_days=1, now=now)
        day = datetime(now.year, now.month, now.day, tzinfo=UTC) - timedelta(days=1)
        timings = await load(conn, devices, day)
        stored: dict[str, Any] = {}
        for t in (METER, VEHICLE):
            stored[t.stream] = {
                "history": await sizes(conn, partition_name(t.history, day.date())),
                "rollup": await sizes(conn, partition_name(t.hourly, day.date())),
                "latest": await sizes(conn, t.latest),
            }
        exported = await export(conn, day, folder)
        for t in (METER, VEHICLE):
            stored[t.stream]["parquet"] = exported[t.stream]
        per = per_reading(stored, devices)
        return {
            "what": "bytes per reading, PostgreSQL and Parquet (scripts/bytes_per_reading.py)",
            "at": now.isoformat(),
            "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
            "postgresql": await conn.fetchval("SHOW server_version"),
            "sample": {
                "meters": devices,
                "vehicles": devices,
                "day": day.date().isoformat(),
                "readings": 2 * devices * MINUTES,
                **timings,
            },
            "stored": stored,
            "export": {k: v for k, v in exported.items() if k not in ("meter", "vehicle")},
            "bytes_per_reading": per,
            "design_point": design_point(per),
        }
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=2000, help="meters, and as many vehicles")
    parser.add_argument("--out", type=Path, default=Path("docs/figures/bytes-per-reading.json"))
    args = parser.parse_args()
    with scratch("energy-ingest-bytes-") as root:
        pg = EmbeddedPostgres(root / "postgres", port=0, fsync=False)
        pg.start()
        try:
            result = asyncio.run(measure(pg.dsn, args.meters, root / "archive"))
        finally:
            pg.stop()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("sample", "export", "bytes_per_reading", "design_point")},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
