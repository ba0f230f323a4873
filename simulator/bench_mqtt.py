"""MQTT benchmarks: draining a stored backlog (beside the database's own ceiling), and
ingest lag at a fixed offered rate."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from daemon.batches import row_of
from daemon.config import Settings
from daemon.readings import MeterReading, VehicleReading
from db.writes import FlushBatch, flush_batch
from simulator.benchkit import (
    BoxCpu,
    Daemon,
    Result,
    Services,
    accepted,
    histogram_quantile,
    reset,
)
from simulator.fleet import Fleet, as_arrays, iso_ms
from simulator.publisher import RawPublisher

FLUSH_READINGS = 2000
# The daemon's default, so that the ceiling writes from as many connections as it flushes on.
FLUSH_CONCURRENCY: int = Settings.model_fields["flush_concurrency"].default


def backlog(readings: int, array: int, start: datetime) -> list[tuple[str, bytes]]:
    """`readings` readings from a fleet, as single messages or gateway arrays of `array`."""
    devices = 2000
    fleet = Fleet(meters=devices // 2, vehicles=devices // 2)
    heartbeats: list[tuple[str, bytes]] = []
    for minute in range(max(1, readings // devices)):
        heartbeats.extend(fleet.minute(start + timedelta(minutes=minute)))
    return as_arrays(heartbeats, array)


def _publish(args: tuple[str, int, list[tuple[str, bytes]], int]) -> int:
    host, port, messages, worker = args
    publisher = RawPublisher(host, port, client_id=f"bench-pub-{worker}")
    try:
        return publisher.publish_many(messages)
    finally:
        publisher.close()


def publish_parallel(port: int, messages: list[tuple[str, bytes]], processes: int = 2) -> float:
    """Publish with several processes; returns messages/s (the broker acked them all)."""
    shares = [(("127.0.0.1"), port, messages[n::processes], n) for n in range(processes)]
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        sent = sum(pool.map(_publish, shares))
    return sent / (time.perf_counter() - started)


async def ceiling(dsn: str, messages: list[tuple[str, bytes]], connections: int) -> float:
    """The same flush transaction, straight from asyncpg with rows built beforehand, from
    `connections` connections at once (the daemon has FLUSH_CONCURRENCY flushes in flight)."""
    now = datetime.now(UTC)
    batches: list[FlushBatch] = []
    batch = FlushBatch()
    count = 0
    for topic, payload in messages:
        decoded = orjson.loads(payload)
        for item in decoded if isinstance(decoded, list) else [decoded]:
            model = MeterReading if topic.startswith("meters/") else VehicleReading
            stream, row = row_of(model.model_validate(item), now)
            batch.rows[stream].append(row)
            count += 1
            if count % FLUSH_READINGS == 0:
                batches.append(batch)
                batch = FlushBatch()
    batches.append(batch)
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]

    async def write(conn: asyncpg.Connection, share: list[FlushBatch]) -> None:
        for b in share:
            await flush_batch(conn, b)

    try:
        started = time.perf_counter()
        await asyncio.gather(
            *(write(conn, batches[n::connections]) for n, conn in enumerate(conns))
        )
        return count / (time.perf_counter() - started)
    finally:
        for conn in conns:
            await conn.close()


def drain(svc: Services, *, readings: int, array: int, runs: int) -> Result:
    result = Result(
        "mqtt-drain", {"readings": readings, "array": array, "flush_max_readings": FLUSH_READINGS}
    )
    for run in range(runs):
        asyncio.run(reset(svc.dsn))
        start = datetime.now(UTC) - timedelta(days=20) + timedelta(hours=run)
        messages = backlog(readings, array, start)
        total = sum(p.count(b'"timestamp"') for _, p in messages)
        daemon = Daemon(svc, flush_max_readings=FLUSH_READINGS)
        daemon.start()  # creates the persistent session and its subscriptions
        daemon.stop()
        publish_rate = publish_parallel(svc.broker.port, messages)
        daemon = Daemon(svc, flush_max_readings=FLUSH_READINGS, flush_concurrency=FLUSH_CONCURRENCY)
        connected_at = daemon.start(until_ready=False)
        box = BoxCpu()
        cpu_before = daemon.cpu_s()
        while True:
            metrics = daemon.metrics()
            if accepted(metrics) >= total:
                break
            time.sleep(0.05)
        drain_s = metrics["energy_ingest_last_commit_unixtime"] - connected_at
        cpu = daemon.cpu_s() - cpu_before
        box_cpu = box.measure()
        rss = daemon.peak_rss_mb()
        daemon.stop()
        ceiling_rates = {}
        for connections in (1, FLUSH_CONCURRENCY):
            asyncio.run(reset(svc.dsn))
            ceiling_rates[connections] = asyncio.run(ceiling(svc.dsn, messages, connections))
        ceiling_rate = ceiling_rates[FLUSH_CONCURRENCY]
        rate = total / drain_s
        run_result: dict[str, Any] = {
            "readings": total,
            "messages": len(messages),
            "drain_s": round(drain_s, 3),
            "readings_per_s": round(rate),
            "ceiling_1_connection_per_s": round(ceiling_rates[1]),
            "ceiling_readings_per_s": round(ceiling_rate),
            "ratio_to_ceiling": round(rate / ceiling_rate, 3),
            "daemon_cpu_share": round(cpu / drain_s, 3),
            **box_cpu,
            "peak_rss_mb": round(rss, 1),
            "mean_flush_readings": round(
                metrics["energy_ingest_flush_readings_sum"]
                / metrics["energy_ingest_flush_readings_count"],
                1,
            ),
            "backlog_publish_msgs_per_s": round(publish_rate),
        }
        result.runs.append(run_result)
        print(f"  run {run + 1}: {run_result}", flush=True)
    return result


def live(svc: Services, *, multiples: list[int], seconds: float, runs: int) -> Result:
    """Publisher and daemon together at a fixed offered rate; lag from reading to commit."""
    design_rate = 20_000 / 60  # 20,000 devices, one reading a minute
    result = Result("mqtt-live", {"multiples_of_design_point": multiples, "seconds": seconds})
    for run in range(runs):
        for multiple in multiples:
            asyncio.run(reset(svc.dsn))
            # One client id for every run: a stopped daemon's session would otherwise go on
            # queueing every message published after it, and load the broker more each run.
            daemon = Daemon(svc, mqtt_client_id="bench-live")
            daemon.start()
            rate = design_rate * multiple
            fleet = Fleet(meters=1000, vehicles=1000, prefix=f"L{multiple}")
            count = int(rate * seconds)
            publisher = RawPublisher("127.0.0.1", svc.broker.port, client_id="bench-live-pub")
            cpu_before = daemon.cpu_s()
            sent = paced_fresh(publisher, fleet, count, rate)
            publisher.close()
            deadline = time.monotonic() + 60
            while accepted(daemon.metrics()) < sent and time.monotonic() < deadline:
                time.sleep(0.05)
            metrics = daemon.metrics()
            run_result = {
                "multiple": multiple,
                "offered_per_s": round(rate),
                "stored": accepted(metrics),
                "lag_p50_ms": ms(
                    histogram_quantile(metrics, "energy_ingest_lag_seconds", 0.5, 'since="reading"')
                ),
                "lag_p99_ms": ms(
                    histogram_quantile(
                        metrics, "energy_ingest_lag_seconds", 0.99, 'since="reading"'
                    )
                ),
                "daemon_cpu_share": round((daemon.cpu_s() - cpu_before) / seconds, 3),
                "peak_rss_mb": round(daemon.peak_rss_mb(), 1),
            }
            daemon.stop()
            result.runs.append(run_result)
            print(f"  run {run + 1}: {run_result}", flush=True)
    return result


def ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


def paced_fresh(publisher: RawPublisher, fleet: Fleet, count: int, rate: float) -> int:
    """Publish `count` readings at `rate`, each stamped with the moment it is sent."""
    template_time = datetime(2000, 1, 1, tzinfo=UTC)
    placeholder = iso_ms(template_time).encode()
    templates = fleet.minute(template_time)
    started = time.perf_counter()
    sent = 0
    while sent < count:
        due = min(count, int((time.perf_counter() - started) * rate) + 1)
        if due <= sent:
            time.sleep(0.002)
            continue
        stamp = iso_ms(datetime.now(UTC)).encode()
        batch = [
            (topic, payload.replace(placeholder, stamp))
            for topic, payload in (templates[n % len(templates)] for n in range(sent, due))
        ]
        publisher.publish_chunk(batch)
        sent = due
    publisher.publish_many([])
    return sent
