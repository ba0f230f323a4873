"""The flush statement of another build beside this one's, at the database alone.

One connection, the same rows (already built), batches of 2,000, alternating rounds on one
PostgreSQL (its tables emptied before each): what a change to the statement costs or saves,
without the daemon, the broker or the machine's other work in the way.

    .venv/bin/python scripts/flush_ab.py /path/to/other/checkout 1    # single readings
    .venv/bin/python scripts/flush_ab.py /path/to/other/checkout 60   # gateway arrays of 60

Prints readings/s per build, each round and the median (BENCHMARKS.md, roll-ups off the flush).
Only the statement is the other build's; its parameters are built as this one builds them, so
the other build must take the same ones (ids and timestamps as array literals: from 754ef94).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import other_build

import db.writes as writes
from db.partitions import prepare_schema
from db.tables import METER
from db.writes import FlushBatch, flush_batch
from simulator.benchkit import private_postgres, scratch

ROUNDS = 4
DEVICES = 2000


def batches(array: int) -> list[FlushBatch]:
    """Single readings: 2,000 meters a minute for 100 minutes. Arrays: 4,000 gateways' hours."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    if array == 1:
        keys = [(f"M{d}", m) for m in range(100) for d in range(DEVICES)]
    else:
        keys = [(f"G{d}", m) for d in range(4000) for m in range(array)]
    rows = [(d, now - timedelta(minutes=200 - m), 0.5, 230.0, now) for d, m in keys]
    out = []
    for i in range(0, len(rows), 2000):
        batch = FlushBatch()
        batch.rows["meter"].extend(rows[i : i + 2000])
        out.append(batch)
    return out


async def rate(dsn: str, sql: str, work: list[FlushBatch]) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        tables = ", ".join((METER.history, METER.latest, METER.hourly, METER.deltas))
        await conn.execute(f"TRUNCATE {tables}; CHECKPOINT")
        writes.FLUSH_SQL = sql
        started = time.perf_counter()
        for batch in work:
            await flush_batch(conn, batch)
        return sum(len(b.rows["meter"]) for b in work) / (time.perf_counter() - started)
    finally:
        await conn.close()


async def main(tree: Path, array: int) -> None:
    sqls = {"other": other_build.load(tree, "db.writes").FLUSH_SQL, "this": writes.FLUSH_SQL}
    with scratch("flush-ab-") as root, private_postgres(root) as pg:
        dsn = pg.dsn
        conn = await asyncpg.connect(dsn)
        await prepare_schema(conn, schema="public", retention_days=30, lookahead_days=3)
        await conn.close()
        work = batches(array)
        rates: dict[str, list[float]] = {name: [] for name in sqls}
        for _ in range(ROUNDS):
            for name, sql in sqls.items():
                rates[name].append(await rate(dsn, sql, work))
    for name, runs in rates.items():
        print(f"{name}: median {statistics.median(runs):,.0f} readings/s", end="")
        print(f" ({' / '.join(f'{r:,.0f}' for r in runs)})")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1))
