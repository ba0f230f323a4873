"""Analytics benchmark: history bulk-loaded in SQL and its hourly roll-ups rebuilt, then the
performance route timed over random vehicles, for a short and a long history: the cost must
follow the window only.

Each run times the route from one keep-alive connection (latency), then from 16 at once
(throughput), and for the latter what a request cost in CPU: the daemon's process and
PostgreSQL's (the postmaster and its backends). With `--peer COMMAND` (a server of the same
route, such as `node scripts/peer-nestjs/dist/main.js`, given DATABASE_URL and PORT), the
same is measured of the peer, on the same data, right after."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from daemon.services import free_port
from simulator.bench_fleet import load_fleet
from simulator.bench_http import wrk
from simulator.benchkit import Daemon, Result, Services, postgres_cpu_s, tree_cpu_s

THROUGHPUT_CONNECTIONS = 16


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


def throughput(
    svc: Services, url: str, server_cpu_s: Callable[[], float], *, devices: int, seconds: int
) -> dict[str, float]:
    """16 connections at once: requests/s, latency, and CPU per request of the server and
    of PostgreSQL."""
    script = ANALYTICS_SCRIPT.format(devices=devices, seed=7)
    server_before, pg_before = server_cpu_s(), postgres_cpu_s(svc.pg)
    measured = wrk(url, script, seconds=seconds, connections=THROUGHPUT_CONNECTIONS, threads=2)
    requests = measured["requests_per_s"] * seconds
    return {
        "c16_requests_per_s": measured["requests_per_s"],
        "c16_p50_ms": measured["p50_ms"],
        "c16_p99_ms": measured["p99_ms"],
        "server_cpu_us_per_request": round((server_cpu_s() - server_before) / requests * 1e6),
        "postgres_cpu_us_per_request": round((postgres_cpu_s(svc.pg) - pg_before) / requests * 1e6),
    }


@contextlib.contextmanager
def peer(svc: Services, command: str) -> Iterator[tuple[str, Callable[[], float]]]:
    """Another server of the route, given DATABASE_URL and PORT: its URL and its CPU."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": svc.dsn, "PORT": str(port)}
    process = subprocess.Popen(shlex.split(command), env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url + "/v1/analytics/performance/V-1", timeout=2)
                break
            assert time.monotonic() < deadline, "the peer did not start"
            time.sleep(0.2)
        yield url, lambda: tree_cpu_s(process.pid)
    finally:
        process.terminate()
        process.wait(30)


def _measure(
    svc: Services,
    server: str,
    url: str,
    cpu: Callable[[], float],
    *,
    devices: int,
    seconds: int,
    run: int,
) -> dict[str, Any]:
    return {
        "server": server,
        **latencies(url, devices, seconds, seed=run + 1),
        **throughput(svc, url, cpu, devices=devices, seconds=seconds),
    }


def analytics(
    svc: Services,
    *,
    devices: int,
    days: list[int],
    step_min: int,
    seconds: int,
    runs: int,
    peer_command: str | None = None,
    compare_with: Path | None = None,
) -> Result:
    result = Result(
        "analytics",
        {
            "devices": devices,
            "days": days,
            "step_min": step_min,
            "seconds": seconds,
            "window": "last 24 h",
            "client": "wrk -t1 -c1 (one keep-alive connection), after asking once per vehicle; "
            f"then wrk -t2 -c{THROUGHPUT_CONNECTIONS}",
            "peer": peer_command,
            "before": str(compare_with) if compare_with else None,
        },
    )
    for history in days:
        load_s = asyncio.run(
            load_history(svc.dsn, devices=devices, days=history, step_min=step_min)
        )
        daemon = Daemon(svc, retention_days=history + 2)
        daemon.start()
        warm_up(daemon.url, devices)
        servers: list[tuple[str, str, Callable[[], float]]] = [
            ("energy-ingest", daemon.url, daemon.cpu_s)
        ]
        with contextlib.ExitStack() as stack:
            if compare_with is not None:
                before = Daemon(
                    svc,
                    tree=compare_with,
                    retention_days=history + 2,
                    mqtt_client_id="bench-daemon-before",
                )
                before.start()
                stack.callback(before.stop)
                warm_up(before.url, devices)
                servers.append(("before", before.url, before.cpu_s))
            if peer_command is not None:
                peer_url, peer_cpu = stack.enter_context(peer(svc, peer_command))
                warm_up(peer_url, devices)
                servers.append(("peer", peer_url, peer_cpu))
            for run in range(runs):
                for server, url, cpu in servers:  # (alternating, run after run)
                    measured = {
                        "days": history,
                        "group": f"{history} days, {server}",
                        "load_s": round(load_s, 1),
                        **_measure(
                            svc, server, url, cpu, devices=devices, seconds=seconds, run=run
                        ),
                    }
                    result.runs.append(measured)
                    print(f"  {history} days, run {run + 1}: {measured}", flush=True)
        daemon.stop()
    by_days = {
        d: statistics.median(
            r["p50_ms"] for r in result.runs if r["days"] == d and r["server"] == "energy-ingest"
        )
        for d in days
    }
    if len(days) == 2:
        short, long = days
        result.parameters["p50_ratio_long_to_short"] = round(by_days[long] / by_days[short], 3)
    return result
