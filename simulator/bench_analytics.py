"""Analytics benchmark: history bulk-loaded in SQL and its hourly roll-ups rebuilt, then the
performance route timed over random vehicles, for a short and a long history: the cost must
follow the window only."""

from __future__ import annotations

import asyncio
import statistics
import time

import asyncpg
import httpx

from db.rollup import rebuild
from simulator.bench_http import wrk
from simulator.benchkit import Daemon, Result, Services, prepare, reset


def _bulk(stream: str, devices: int, days: int, step_min: int) -> str:
    if stream == "meter":
        columns, values = "meter_id, ts, kwh_consumed_ac, voltage", "'M-' || d, t, 0.1, 230"
    else:
        columns = "vehicle_id, ts, soc, kwh_delivered_dc, battery_temp"
        values = "'V-' || d, t, 50, 0.088, 25"
    return f"""
INSERT INTO {stream}_readings ({columns}, received_at)
SELECT {values}, t
FROM generate_series(now() - interval '{days} days', now(), interval '{step_min} minutes') t,
     generate_series(1, {devices}) d"""


async def load_history(dsn: str, *, devices: int, days: int, step_min: int) -> float:
    await reset(dsn)
    await prepare(dsn, retention_days=days + 2)
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        await conn.execute(_bulk("meter", devices, days, step_min))
        await conn.execute(_bulk("vehicle", devices, days, step_min))
        await conn.execute(
            f"INSERT INTO charging_sessions (vehicle_id, meter_id, started_at) "
            f"SELECT 'V-' || d, 'M-' || d, now() - interval '{days + 1} days' "
            f"FROM generate_series(1, {devices}) d"
        )
        # The hourly roll-ups, as the daemon's flush would have kept them.
        span = "SELECT min(ts), max(ts) + interval '1 microsecond' FROM meter_readings"
        await rebuild(conn, *await conn.fetchrow(span))
        await conn.execute("VACUUM ANALYZE")
        return time.perf_counter() - started
    finally:
        await conn.close()


ANALYTICS_SCRIPT = """
math.randomseed({seed})
function request()
  return wrk.format("GET", "/v1/analytics/performance/V-" .. math.random(1, {devices}))
end
"""


def warm_up(url: str, devices: int) -> None:
    """Ask once for every vehicle: what a bulk load leaves in the caches differs between the
    short and the long history (the whole short one fits in shared buffers), while a running
    fleet keeps its recent days cached by writing and reading them all day."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for n in range(1, devices + 1):
            client.get(f"/v1/analytics/performance/V-{n}").raise_for_status()


def latencies(url: str, devices: int, seconds: int, seed: int) -> dict[str, float]:
    """One keep-alive connection asking for random vehicles (wrk: timed in C, not Python)."""
    script = ANALYTICS_SCRIPT.format(devices=devices, seed=seed)
    return wrk(url, script, seconds=seconds, connections=1, threads=1)


def analytics(
    svc: Services, *, devices: int, days: list[int], step_min: int, seconds: int, runs: int
) -> Result:
    result = Result(
        "analytics",
        {
            "devices": devices,
            "days": days,
            "step_min": step_min,
            "seconds": seconds,
            "window": "last 24 h",
            "client": "wrk -t1 -c1 (one keep-alive connection), after asking once per vehicle",
        },
    )
    for history in days:
        load_s = asyncio.run(
            load_history(svc.dsn, devices=devices, days=history, step_min=step_min)
        )
        daemon = Daemon(svc, retention_days=history + 2)
        daemon.start()
        warm_up(daemon.url, devices)
        for run in range(runs):
            measured = {
                "days": history,
                "load_s": round(load_s, 1),
                **latencies(daemon.url, devices, seconds, seed=run + 1),
            }
            result.runs.append(measured)
            print(f"  {history} days, run {run + 1}: {measured}", flush=True)
        daemon.stop()
    by_days = {
        d: statistics.median(r["p50_ms"] for r in result.runs if r["days"] == d) for d in days
    }
    if len(days) == 2:
        short, long = days
        result.parameters["p50_ratio_long_to_short"] = round(by_days[long] / by_days[short], 3)
    return result
