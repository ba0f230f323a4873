"""The fleet route's statement of another build beside this one's, at the database alone.

The design point of `bench fleet` (10,000 vehicles and meters, a reading a minute for 24 h,
roll-ups rebuilt), then the first page of the last 24 h, alternating between the builds,
`ROUNDS` times each on one connection: what a change to the statement costs or saves at
PostgreSQL, without the daemon or the HTTP client in the way.

    .venv/bin/python scripts/fleet_ab.py /path/to/other/checkout [devices]

Prints milliseconds per statement for each build: median and p90 (BENCHMARKS.md, fleet).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import asyncpg
import other_build

import db.analytics as analytics
from db.windows import pieces
from simulator.bench_fleet import load_fleet
from simulator.benchkit import prepare, private_postgres, scratch

ROUNDS = 40


async def timed(conn: asyncpg.Connection, module: ModuleType) -> float:
    end = datetime.now(UTC)
    start = end - timedelta(hours=24)
    window = pieces(start, end, now=end)
    args = [*module._args(window, start, end), False, 0.0, *module.FIRST_KEY, 101]
    started = time.perf_counter()
    await conn.fetch(module.fleet_sql(window), *args)
    return (time.perf_counter() - started) * 1000


async def main(tree: Path, devices: int) -> None:
    builds = {"other": other_build.load(tree, "db.analytics"), "this": analytics}
    with scratch("fleet-ab-") as root, private_postgres(root) as pg:
        dsn = pg.dsn
        await prepare(dsn)
        print(await load_fleet(dsn, devices=devices, hours=24, step_min=1), flush=True)
        conn = await asyncpg.connect(dsn)
        try:
            times: dict[str, list[float]] = {name: [] for name in builds}
            for module in builds.values():  # (once each, unmeasured)
                await timed(conn, module)
            for _ in range(ROUNDS):
                for name, module in builds.items():
                    times[name].append(await timed(conn, module))
        finally:
            await conn.close()
    for name, runs in times.items():
        p90 = statistics.quantiles(runs, n=10)[-1]
        print(f"{name}: median {statistics.median(runs):.1f} ms, p90 {p90:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 10_000))
