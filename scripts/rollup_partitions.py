"""What two years of roll-up partitions cost operators' reads, and what merging a month costs.

Operators' reads run prepared statements' generic plans (`db.pool.read_settings`), and
PostgreSQL 15 locks every partition of a generic plan when it runs, pruned or not. With
ROLLUP_RETENTION_DAYS at two years, day partitions of the roll-ups are 730 a table. Three
layouts of one private PostgreSQL, side by side, measured in turns:

- `30 days`: roll-ups kept as long as the raw history (no roll-up past it);
- `730 days, by day`: two years of roll-ups in day partitions (as before months were merged);
- `730 days, by month`: the same years as upkeep leaves them, a partition per month past
  the raw history.

For each: the locks one vehicle's analytics statement takes, and its latency over `--calls`
calls (median of `--runs` runs). Then the merge: a month of roll-ups for `--devices` devices
a stream, an hour each, in day partitions, merged by upkeep, timed, with the longest a
vehicle's read waited meanwhile; extrapolated to the design point (20,000 a stream).

    .venv/bin/python scripts/rollup_partitions.py [--devices 2000] [--out docs/figures/...]

CPU-heavy (about a minute on two cores): run it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from daemon.services import EmbeddedPostgres
from db.analytics import _args, vehicle_sql
from db.partitions import first_day, next_month, partition_name, prepare_schema, upkeep
from db.pool import read_settings
from db.tables import HISTORIES, PARTITIONED
from db.windows import pieces
from simulator.benchkit import scratch

RETENTION_DAYS = 30
LOOKAHEAD_DAYS = 3
DESIGN_DEVICES = 20_000  # per stream

LOAD_MONTH = """
INSERT INTO {table} ({id}, hour, {columns})
SELECT '{prefix}-' || lpad(d::text, 6, '0'), h, {values}
FROM generate_series($1::timestamptz, $2::timestamptz - interval '1 hour', '1 hour') h
CROSS JOIN generate_series(1, $3::int) d"""
MONTHS = {
    "meter_hourly": ("meter_id", "kwh_consumed_ac, readings", "random(), 60", "meter"),
    "vehicle_hourly": (
        "vehicle_id",
        "kwh_delivered_dc, readings, battery_temp_sum, last_ts, last_soc",
        "random(), 60, 1500 * random(), h + interval '59 minutes', 100 * random()",
        "vehicle",
    ),
}


async def database(admin: asyncpg.Connection, dsn: str, name: str) -> str:
    await admin.execute(f"CREATE DATABASE {name}")
    return dsn.rsplit("/", 1)[0] + "/" + name


async def years_of_upkeep(conn: asyncpg.Connection, now: datetime, days: int) -> None:
    """Upkeep as a daemon running `days` days would have run it (a month at a time)."""
    for back in range(days, -1, -30):
        at = now - timedelta(days=back)
        while (
            await upkeep(
                conn,
                schema="public",
                now=at,
                retention_days=RETENTION_DAYS,
                lookahead_days=LOOKAHEAD_DAYS,
                rollup_retention_days=days,
            )
        ).merged:
            pass


async def day_partitions(conn: asyncpg.Connection, first: date, end: date) -> None:
    """The roll-ups' day partitions from `first` to `end`, every one of them (nothing
    merged)."""
    for table, options in PARTITIONED.items():
        if table in HISTORIES:
            continue
        for n in range((end - first).days):
            day = first + timedelta(days=n)
            after = day + timedelta(days=1)
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{partition_name(table, day)}" PARTITION OF {table} '
                f"FOR VALUES FROM ('{day} 00:00:00+00') TO ('{after} 00:00:00+00'){options}"
            )


async def layouts(admin: asyncpg.Connection, dsn: str, now: datetime) -> dict[str, str]:
    made: dict[str, str] = {}
    for key, days, merged in (
        ("30 days", RETENTION_DAYS, True),
        ("730 days, by day", 730, False),
        ("730 days, by month", 730, True),
    ):
        url = await database(admin, dsn, "layout_" + key.replace(" ", "_").replace(",", ""))
        conn = await asyncpg.connect(url)
        await prepare_schema(
            conn, schema="public", retention_days=RETENTION_DAYS, lookahead_days=LOOKAHEAD_DAYS
        )
        if merged:
            await years_of_upkeep(conn, now, days)
        else:
            await day_partitions(conn, first_day(now, days), first_day(now, RETENTION_DAYS))
        await conn.close()
        made[key] = url
    return made


async def vehicle_reads(url: str, now: datetime, calls: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url, server_settings=read_settings(30))
    try:
        start, end = now - timedelta(hours=24), now
        split = pieces(start, end, now=now)
        statement = await conn.prepare(vehicle_sql(split))
        args = [*_args(split, start, end), "vehicle-000001", 900.0]
        for _ in range(10):  # (past the custom plans, to the generic one)
            await statement.fetch(*args)
        took = []
        for _ in range(calls):
            began = time.perf_counter()
            await statement.fetch(*args)
            took.append(time.perf_counter() - began)
        async with conn.transaction():
            await statement.fetch(*args)
            locks = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid()"
            )
        partitions = await conn.fetchval(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE c.relkind = 'r'"
        )
    finally:
        await conn.close()
    took.sort()
    return {
        "partitions": partitions,
        "locks_per_read": locks,
        "p50_ms": round(took[len(took) // 2] * 1000, 3),
        "p99_ms": round(took[int(len(took) * 0.99)] * 1000, 3),
    }


async def merge_cost(admin: asyncpg.Connection, dsn: str, now: datetime, devices: int) -> Any:
    """A month of roll-ups in day partitions, merged by upkeep while a vehicle's read loops."""
    url = await database(admin, dsn, "merge")
    conn = await asyncpg.connect(url)
    month = first_day(now, RETENTION_DAYS).replace(day=1)
    month = (month - timedelta(days=1)).replace(day=1)  # the month before: mergeable
    await prepare_schema(
        conn, schema="public", retention_days=RETENTION_DAYS, lookahead_days=LOOKAHEAD_DAYS
    )
    await day_partitions(conn, month, next_month(month))
    lo = datetime(month.year, month.month, 1, tzinfo=UTC)
    hi = datetime(*next_month(month).timetuple()[:3], tzinfo=UTC)
    rows = 0
    for table, (id_column, columns, values, prefix) in MONTHS.items():
        sql = LOAD_MONTH.format(
            table=table, id=id_column, columns=columns, values=values, prefix=prefix
        )
        rows += int((await conn.execute(sql, lo, hi, devices)).split()[-1])
    await conn.execute("VACUUM ANALYZE")

    longest = 0.0
    done = asyncio.Event()

    async def reader() -> None:
        nonlocal longest
        reads = await asyncpg.connect(url, server_settings=read_settings(30))
        split = pieces(lo, lo + timedelta(days=1), now=now)
        statement = await reads.prepare(vehicle_sql(split))
        args = [*_args(split, lo, lo + timedelta(days=1)), "vehicle-000001", 900.0]
        while not done.is_set():
            began = time.perf_counter()
            await statement.fetch(*args)
            longest = max(longest, time.perf_counter() - began)
            await asyncio.sleep(0.01)
        await reads.close()

    task = asyncio.create_task(reader())
    began = time.perf_counter()
    report = await upkeep(
        conn,
        schema="public",
        now=now,
        retention_days=RETENTION_DAYS,
        lookahead_days=LOOKAHEAD_DAYS,
        rollup_retention_days=365,
    )
    seconds = time.perf_counter() - began
    done.set()
    await task
    await conn.close()
    scale = DESIGN_DEVICES / devices
    return {
        "month": f"{month:%Y-%m}",
        "devices_per_stream": devices,
        "rows_merged": rows,
        "merged": report.merged,
        "upkeep_seconds": round(seconds, 2),
        "rows_per_second": round(rows / seconds),
        "longest_vehicle_read_during_merge_ms": round(longest * 1000, 1),
        "design_point_seconds_estimate": round(seconds * scale, 1),
    }


async def measure(dsn: str, devices: int, calls: int, runs: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    admin = await asyncpg.connect(dsn)
    try:
        made = await layouts(admin, dsn, now)
        rounds: dict[str, list[dict[str, Any]]] = {key: [] for key in made}
        for _ in range(runs):  # in turns, so that the box's noise falls on each alike
            for key, url in made.items():
                rounds[key].append(await vehicle_reads(url, now, calls))
        reads = {
            key: {
                "partitions": got[0]["partitions"],
                "locks_per_read": got[0]["locks_per_read"],
                "p50_ms": statistics.median(r["p50_ms"] for r in got),
                "p99_ms": statistics.median(r["p99_ms"] for r in got),
                "runs": got,
            }
            for key, got in rounds.items()
        }
        merge = await merge_cost(admin, dsn, now, devices)
    finally:
        await admin.close()
    return {"vehicle_read": reads, "merge": merge}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/rollup-partitions.json"))
    args = parser.parse_args()
    with scratch("energy-ingest-rollups-") as root:
        pg = EmbeddedPostgres(root / "postgres", port=0, fsync=False)
        dsn = pg.start()
        try:
            result = asyncio.run(measure(dsn, args.devices, args.calls, args.runs))
        finally:
            pg.stop()
    result["machine"] = {
        "cpus": os.cpu_count(),
        "arch": platform.machine(),
        "python": platform.python_version(),
    }
    result["command"] = "scripts/rollup_partitions.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out"
    )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "vehicle_read"}, indent=2))
    for key, got in result["vehicle_read"].items():
        print(key, {k: v for k, v in got.items() if k != "runs"})


if __name__ == "__main__":
    main()
