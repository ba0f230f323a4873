"""Fleet and series benchmarks: a fleet's history bulk-loaded in SQL, its hourly roll-ups
rebuilt from it (`db.rollup`, as after any import: the daemon's flush keeps them otherwise),
then the routes timed by wrk over one keep-alive connection.

`fleet`: GET /v1/analytics/fleet over the default window (the last 24 h) at the design point
(10,000 vehicles and 10,000 meters, one reading a minute each: 28.8 million rows), then the
same fleet with one day of history and with thirty (readings every 15 minutes, to keep the
thirty days within a benchmark's time and disk): the answer must not slow as history grows.

`series`: GET /v1/analytics/performance/{id}/series?bucket=1h over the last 30 days, for
random vehicles with thirty days of one-minute readings.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from db.rollup import rebuild
from simulator.bench_http import wrk
from simulator.benchkit import Daemon, Result, Services, prepare, reset

# Each vehicle charges on its own meter, losing 6 to 30 % (a few under the 0.85 threshold);
# SoC and battery temperature move with time, so that every bucket differs. Rows go in in time
# order, minute after minute, as the daemon writes them (what the history's BRIN index on ts
# relies on: a window's edge over the whole fleet reads only the blocks of its minutes).
_METERS = """
INSERT INTO meter_readings (meter_id, ts, kwh_consumed_ac, voltage, received_at)
SELECT 'M-' || d, t, 0.1, 230, t
FROM generate_series($2::timestamptz, $3::timestamptz - interval '1 second', $4::interval) t
CROSS JOIN LATERAL generate_series(1, $1::int) d"""
_VEHICLES = """
INSERT INTO vehicle_readings (vehicle_id, ts, soc, kwh_delivered_dc, battery_temp, received_at)
SELECT 'V-' || d, t, (extract(epoch FROM t)::bigint / 60 + d) % 100,
       0.1 * (0.70 + (d % 25) * 0.01), 15 + (extract(epoch FROM t)::bigint / 3600 + d) % 20, t
FROM generate_series($2::timestamptz, $3::timestamptz - interval '1 second', $4::interval) t
CROSS JOIN LATERAL generate_series(1, $1::int) d"""
_SESSIONS = """
INSERT INTO charging_sessions (vehicle_id, meter_id, started_at)
SELECT 'V-' || d, 'M-' || d, $2::timestamptz - interval '1 hour'
FROM generate_series(1, $1::int) d"""


async def load_fleet(dsn: str, *, devices: int, hours: int, step_min: int) -> dict[str, Any]:
    """`devices` vehicles and as many meters, a reading every `step_min` minutes for the
    last `hours` hours (whole minutes, ending now)."""
    await reset(dsn)
    await prepare(dsn, retention_days=hours // 24 + 2)
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    start = end - timedelta(hours=hours)
    step = timedelta(minutes=step_min)
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        await conn.execute(_METERS, devices, start, end, step)
        await conn.execute(_VEHICLES, devices, start, end, step)
        await conn.execute(_SESSIONS, devices, start)
        loaded = time.perf_counter()
        await rebuild(conn, start, end)
        rebuilt = time.perf_counter()
        await conn.execute("VACUUM ANALYZE")
        rows = await conn.fetchval(
            "SELECT (SELECT count(*) FROM meter_readings) + (SELECT count(*) FROM vehicle_readings)"
        )
        hourly = await conn.fetchval(
            "SELECT (SELECT count(*) FROM meter_hourly) + (SELECT count(*) FROM vehicle_hourly)"
        )
        return {
            "rows": rows,
            "hourly_rows": hourly,
            "load_s": round(loaded - started, 1),
            "rollup_rebuild_s": round(rebuilt - loaded, 1),
        }
    finally:
        await conn.close()


FLEET_SCRIPT = """
function request()
  return wrk.format("GET", "{path}")
end
"""

SERIES_SCRIPT = """
math.randomseed({seed})
function request()
  return wrk.format("GET", "/v1/analytics/performance/V-" .. math.random(1, {devices}) ..
    "/series?bucket=1h&startTime={start}&endTime={end}")
end
"""

FLEET_REQUESTS = {
    "first page": "/v1/analytics/fleet",
    "alerts only": "/v1/analytics/fleet?alert=true",
    "whole fleet, one page": "/v1/analytics/fleet?limit=10000",
}


def _timed(url: str, script: str, seconds: int) -> dict[str, float]:
    return wrk(url, script, seconds=seconds, connections=1, threads=1)


def _warm(url: str, paths: list[str]) -> None:
    """Ask each once first (the bulk load leaves other pages in the caches than a day of
    running would)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for path in paths:
            client.get(path).raise_for_status()


def _measure_fleet(
    result: Result, daemon: Daemon, stage: dict[str, Any], paths: dict[str, str], seconds: int
) -> None:
    _warm(daemon.url, list(paths.values()))
    for name, path in paths.items():
        timed = _timed(daemon.url, FLEET_SCRIPT.format(path=path), seconds)
        measured = {"case": f"{stage['stage']}: {name} ({stage['build']})", **stage, **timed}
        result.runs.append(measured)
        print(f"  {measured}", flush=True)


def fleet(
    svc: Services,
    *,
    devices: int,
    step_min: int,
    growth_days: list[int],
    growth_step_min: int,
    seconds: int,
    runs: int,
    compare_with: Path | None = None,
    stages_wanted: int | None = None,
) -> Result:
    result = Result(
        "fleet",
        {
            "devices": devices,
            "design_point": f"24 h, a reading every {step_min} min per device",
            "growth": f"{growth_days} days, a reading every {growth_step_min} min per device",
            "seconds": seconds,
            "window": "the last 24 h (the route's default)",
            "client": "wrk -t1 -c1 (one keep-alive connection), after asking once",
            "before": str(compare_with) if compare_with else None,
        },
    )
    builds: list[tuple[str, Path | None]] = [("after", None)]
    if compare_with is not None:
        builds.insert(0, ("before", compare_with))
    stages = [("design point", 24, step_min, FLEET_REQUESTS)]
    stages += [
        (
            f"{days} days of history",
            days * 24,
            growth_step_min,
            {"first page": FLEET_REQUESTS["first page"]},
        )
        for days in growth_days
    ]
    for label, hours, step, paths in stages[:stages_wanted]:
        loaded = asyncio.run(load_fleet(svc.dsn, devices=devices, hours=hours, step_min=step))
        print(f"  {label}: {loaded}", flush=True)
        for run in range(runs):
            for build, tree in builds:  # (alternating, on the same history)
                daemon = Daemon(svc, tree=tree, retention_days=hours // 24 + 2)
                daemon.start()
                stage = {"stage": label, "build": build, "run": run + 1, **loaded}
                _measure_fleet(result, daemon, stage, paths, seconds)
                daemon.stop()
    growth = [
        statistics.median(
            r["p99_ms"]
            for r in result.runs
            if r["stage"] == f"{days} days of history" and r["build"] == "after"
        )
        for days in growth_days
        if any(r["stage"] == f"{days} days of history" for r in result.runs)
    ]
    if len(growth) == 2:
        result.parameters["p99_ratio_long_to_short_history"] = round(growth[1] / growth[0], 3)
    return result


def series(
    svc: Services, *, devices: int, days: int, step_min: int, seconds: int, runs: int
) -> Result:
    result = Result(
        "series",
        {
            "devices": devices,
            "history": f"{days} days, a reading every {step_min} min per device",
            "request": f"bucket=1h over the last {days} days, a random vehicle each time",
            "seconds": seconds,
            "client": "wrk -t1 -c1 (one keep-alive connection), after asking once per vehicle",
        },
    )
    loaded = asyncio.run(load_fleet(svc.dsn, devices=devices, hours=days * 24, step_min=step_min))
    print(f"  {loaded}", flush=True)
    daemon = Daemon(svc, retention_days=days + 2)
    daemon.start()
    end = datetime.now(UTC)
    window = {
        "start": (end - timedelta(days=days)).isoformat().replace("+00:00", "Z"),
        "end": end.isoformat().replace("+00:00", "Z"),
    }
    query = f"?bucket=1h&startTime={window['start']}&endTime={window['end']}"
    _warm(
        daemon.url,
        [f"/v1/analytics/performance/V-{n}/series{query}" for n in range(1, devices + 1)],
    )
    for run in range(runs):
        script = SERIES_SCRIPT.format(seed=run + 1, devices=devices, **window)
        measured = {"run": run + 1, **loaded, **_timed(daemon.url, script, seconds)}
        result.runs.append(measured)
        print(f"  {measured}", flush=True)
    daemon.stop()
    return result
