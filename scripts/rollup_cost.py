"""What keeping the hourly roll-ups costs the flush statement at the database.

The flush statement straight from asyncpg (the ceiling of `energy-ingest bench mqtt-drain`),
one connection, with and without the roll-up upserts (`db.writes._HOURLY` swapped for a
no-op) and with and without the history's BRIN index on `ts`, alternating, three rounds:

    .venv/bin/python scripts/rollup_cost.py 1     # single readings
    .venv/bin/python scripts/rollup_cost.py 60    # gateway arrays of 60

Prints readings/s per variant, medians and runs (BENCHMARKS.md, the drain with roll-ups).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from datetime import UTC, datetime, timedelta

import asyncpg

import db.writes as writes
from simulator.bench_mqtt import backlog, ceiling
from simulator.benchkit import reset, services

KEPT = dict(writes._HOURLY)
NONE = {"meter": "SELECT 1", "vehicle": "SELECT 1"}
BRIN = (
    "CREATE INDEX IF NOT EXISTS meter_readings_ts ON meter_readings USING brin (ts);"
    "CREATE INDEX IF NOT EXISTS vehicle_readings_ts ON vehicle_readings USING brin (ts)"
)
NO_BRIN = "DROP INDEX IF EXISTS meter_readings_ts; DROP INDEX IF EXISTS vehicle_readings_ts"
VARIANTS = {
    "roll-ups": (KEPT, BRIN),
    "no roll-ups": (NONE, BRIN),
    "no roll-ups, no BRIN": (NONE, NO_BRIN),
    "roll-ups, no BRIN": (KEPT, NO_BRIN),
}


def use(hourly: dict[str, str]) -> None:
    writes._HOURLY.clear()
    writes._HOURLY.update(hourly)
    writes.FLUSH_SQL = writes._flush_sql()


async def prepare(dsn: str, index_sql: str) -> None:
    await reset(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(index_sql)
    finally:
        await conn.close()


def main() -> None:
    array = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    results: dict[str, list[int]] = {name: [] for name in VARIANTS}
    with services() as svc:
        for round_ in range(3):
            for name, (hourly, index_sql) in VARIANTS.items():
                asyncio.run(prepare(svc.dsn, index_sql))
                start = datetime.now(UTC) - timedelta(days=10) + timedelta(hours=3 * round_)
                messages = backlog(120_000, array, start)
                use(hourly)
                results[name].append(round(asyncio.run(ceiling(svc.dsn, messages, 1))))
    for name, runs in results.items():
        print(f"array {array}: {name}: {statistics.median(runs):,.0f} readings/s {runs}")


if __name__ == "__main__":
    main()
