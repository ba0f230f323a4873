"""Analytics benchmark: history bulk-loaded in SQL and its hourly roll-ups rebuilt, then the
performance route timed over random vehicles, for a short and a long history: the cost must
follow the window only."""

from __future__ import annotations

import asyncio
import statistics

import httpx

from simulator.bench_fleet import load_fleet
from simulator.bench_http import wrk
from simulator.benchkit import Daemon, Result, Services


async def load_history(dsn: str, *, devices: int, days: int, step_min: int) -> float:
    """The fleet benchmark's history (time-ordered, each vehicle linked to its meter, the
    roll-ups rebuilt), `days` long; returns the seconds it took."""
    loaded = await load_fleet(dsn, devices=devices, hours=days * 24, step_min=step_min)
    return float(loaded["load_s"] + loaded["rollup_rebuild_s"])


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
