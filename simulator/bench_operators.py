"""`energy-ingest bench operators`: ingestion while operators read the fleet.

A fleet's history is bulk-loaded in SQL (the fleet benchmark's loader: time-ordered, roll-ups
summed from it). Then, for SECONDS, meters and vehicles publish over MQTT at RATE readings a
second (10x the design point by default), each stamped with the moment it is sent, while
READERS clients of wrk loop on the heaviest fleet page there is: the widest window
(ANALYTICS_MAX_WINDOW_DAYS) and the largest page (10,000 vehicles). Measured: lag from a
reading's own timestamp (its publication) to its commit and from its arrival to its commit
(p50, p99, the daemon's histograms), how long after the publisher's end every reading was
stored, /health asked every 250 ms (non-200 answers, slowest answer), the event loop's lag
(longest, and the share of samples over the 20 ms budget), the fleet readers' answers
(200, 503) and latency, the daemon's CPU.

With `--compare-with PATH` (another checkout of the project, such as the commit before a
change), each run is made once with that build's daemon and once with this one,
alternating, on the same loaded history: a before and after side by side.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from simulator.bench_fleet import load_fleet
from simulator.bench_http import wrk_process, wrk_results
from simulator.bench_mqtt import ms, paced_fresh
from simulator.benchkit import Daemon, Result, Services, accepted, histogram_quantile
from simulator.fleet import Fleet
from simulator.publisher import RawPublisher

LOOP_BUDGET_S = 0.02
FLEET_READER_SCRIPT = """
function request()
  return wrk.format("GET", "/v1/analytics/fleet?limit=10000&startTime={start}&endTime={end}")
end
"""


class HealthWatch(threading.Thread):
    """/health every `every_s`: its answers and the slowest of them."""

    def __init__(self, url: str, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.url = url + "/health"
        self.every_s = every_s
        self.answers: dict[int, int] = {}
        self.slowest_s = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._halt.is_set():
                started = time.monotonic()
                try:
                    status = client.get(self.url).status_code
                except httpx.HTTPError:
                    status = 0
                self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                self.answers[status] = self.answers.get(status, 0) + 1
                self._halt.wait(self.every_s)

    def stop(self) -> dict[str, Any]:
        self._halt.set()
        self.join(60)
        return {
            "health_answers": {str(k): v for k, v in sorted(self.answers.items())},
            "health_non_200": sum(v for k, v in self.answers.items() if k != 200),
            "health_slowest_ms": round(self.slowest_s * 1000, 1),
        }


def _loop_figures(metrics: dict[str, float]) -> dict[str, Any]:
    """The event loop's lag, when the daemon measures it (builds before it did not)."""
    total = metrics.get("energy_ingest_event_loop_lag_seconds_count")
    if not total:
        return {"loop_lag_max_ms": None, "loop_samples_over_budget": None}
    within = metrics.get(f'energy_ingest_event_loop_lag_seconds_bucket{{le="{LOOP_BUDGET_S}"}}')
    over = "energy_ingest_event_loop_lags_over_budget_total"
    return {
        "loop_lag_max_ms": round(metrics["energy_ingest_event_loop_lag_max_seconds"] * 1000, 1),
        "loop_lag_p99_ms": ms(
            histogram_quantile(metrics, "energy_ingest_event_loop_lag_seconds", 0.99)
        ),
        "loop_samples_over_budget": round(1 - (within or 0) / total, 5),
        # Of those: the loop running code all along (a request holding it), or the process
        # waiting for a CPU (the machine's cores busy, PostgreSQL's among them).
        "loop_over_budget_running": metrics.get(f'{over}{{cause="running"}}', 0.0),
        "loop_over_budget_waiting_for_cpu": metrics.get(
            f'{over}{{cause="waiting for a CPU"}}', 0.0
        ),
    }


def _one_run(
    svc: Services,
    build: str,
    tree: Path | None,
    *,
    rate: int,
    seconds: int,
    readers: int,
    run: int,
) -> dict[str, Any]:
    # A session that ends with the connection: nothing published during another build's run
    # waits for this one as a backlog.
    daemon = Daemon(
        svc,
        tree=tree,
        mqtt_client_id=f"bench-operators-{build}-{run}",
        mqtt_session_expiry_s=0,
        retention_days=40,
    )
    daemon.start()
    end = datetime.now(UTC)
    window = {"start": (end - timedelta(days=31)).isoformat(), "end": end.isoformat()}
    script = FLEET_READER_SCRIPT.format(
        start=window["start"].replace("+", "%2B"), end=window["end"].replace("+", "%2B")
    )
    reading = wrk_process(daemon.url, script, seconds=seconds + 5, connections=readers)
    watch = HealthWatch(daemon.url)
    watch.start()
    time.sleep(2)  # the readers at work before the meters start
    fleet = Fleet(meters=1000, vehicles=1000, prefix=f"OP{run}{build[0]}")
    publisher = RawPublisher("127.0.0.1", svc.broker.port, client_id="bench-operators-pub")
    cpu_before = daemon.cpu_s()
    sent = paced_fresh(publisher, fleet, rate * seconds, rate)
    published_at = time.monotonic()
    publisher.close()
    deadline = time.monotonic() + 300
    while accepted(daemon.metrics()) < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    stored_after_s = time.monotonic() - published_at
    metrics = daemon.metrics()
    readers_result = wrk_results(reading)
    measured: dict[str, Any] = {
        "build": build,
        "run": run + 1,
        "offered_per_s": rate,
        "sent": sent,
        "stored": accepted(metrics),
        "stored_after_publisher_end_s": round(stored_after_s, 2),
        "lag_since_reading_p50_ms": ms(
            histogram_quantile(metrics, "energy_ingest_lag_seconds", 0.5, 'since="reading"')
        ),
        "lag_since_reading_p99_ms": ms(
            histogram_quantile(metrics, "energy_ingest_lag_seconds", 0.99, 'since="reading"')
        ),
        "lag_since_receive_p99_ms": ms(
            histogram_quantile(metrics, "energy_ingest_lag_seconds", 0.99, 'since="receive"')
        ),
        **watch.stop(),
        **_loop_figures(metrics),
        "fleet_requests_per_s": readers_result["requests_per_s"],
        "fleet_non_2xx": readers_result["non_2xx"],
        "fleet_p50_ms": readers_result["p50_ms"],
        "fleet_p99_ms": readers_result["p99_ms"],
        "daemon_cpu_share": round((daemon.cpu_s() - cpu_before) / (seconds + stored_after_s), 3),
        "peak_rss_mb": round(daemon.peak_rss_mb(), 1),
    }
    daemon.stop()
    return measured


def operators(
    svc: Services,
    *,
    vehicles: int,
    hours: int,
    step_min: int,
    rate: int,
    seconds: int,
    readers: int,
    runs: int,
    compare_with: Path | None = None,
) -> Result:
    result = Result(
        "operators",
        {
            "vehicles": vehicles,
            "history": f"{hours} h, a reading every {step_min} min per device (and meter)",
            "offered_readings_per_s": rate,
            "seconds": seconds,
            "readers": f"wrk -t2 -c{readers}: GET /v1/analytics/fleet, 31-day window, limit 10000",
            "builds": ["before", "after"] if compare_with else ["after"],
            "before": str(compare_with) if compare_with else None,
        },
    )
    loaded = asyncio.run(load_fleet(svc.dsn, devices=vehicles, hours=hours, step_min=step_min))
    print(f"  loaded: {loaded}", flush=True)
    builds: list[tuple[str, Path | None]] = [("after", None)]
    if compare_with is not None:
        builds.insert(0, ("before", compare_with))
    for run in range(runs):
        for build, tree in builds:
            measured = _one_run(
                svc, build, tree, rate=rate, seconds=seconds, readers=readers, run=run
            )
            result.runs.append(measured)
            print(f"  {measured}", flush=True)
    return result
