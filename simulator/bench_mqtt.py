"""MQTT benchmarks: draining a stored backlog (beside the database's own ceiling), and
ingest lag at a fixed offered rate."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from db.writes import FlushBatch, flush_batch
from ingest.batches import row_of
from ingest.config import Settings
from ingest.readings import MeterReading, VehicleReading
from simulator.benchkit import (
    BoxCpu,
    Daemon,
    Result,
    Services,
    accepted,
    histogram_quantile,
    postgres_cpu_s,
    process_cpu_s,
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


# The physical limit a drain is measured against: one PostgreSQL connection inserting the same
# rows, in batches of FLUSH_READINGS, into plain tables shaped like the history (the device
# and the timestamp as the key, the summed value carried in it) and nothing else: no
# partitions, no latest state, no roll-ups, no rejections. Nothing of the daemon's flush is
# in it, so a heavier flush cannot make the daemon look closer to it.
BARE_TABLES = """
DROP TABLE IF EXISTS bare_meter, bare_vehicle;
CREATE TABLE bare_meter (LIKE meter_readings INCLUDING DEFAULTS);
ALTER TABLE bare_meter ADD PRIMARY KEY (meter_id, ts) INCLUDE (kwh_consumed_ac);
CREATE TABLE bare_vehicle (LIKE vehicle_readings INCLUDING DEFAULTS);
ALTER TABLE bare_vehicle ADD PRIMARY KEY (vehicle_id, ts) INCLUDE (kwh_delivered_dc, battery_temp);
"""
BARE_INSERT = """
WITH m AS (
    INSERT INTO bare_meter
    SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::float8[], $4::float8[],
                         $5::timestamptz[])
    ON CONFLICT DO NOTHING
), v AS (
    INSERT INTO bare_vehicle
    SELECT * FROM unnest($6::text[], $7::timestamptz[], $8::float8[], $9::float8[],
                         $10::float8[], $11::timestamptz[])
    ON CONFLICT DO NOTHING
)
SELECT 1"""


def _batches(messages: list[tuple[str, bytes]]) -> tuple[list[FlushBatch], int]:
    """The backlog's readings as flush batches of FLUSH_READINGS, built beforehand."""
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
    return batches, count


async def _from_connections(
    dsn: str, batches: list[FlushBatch], connections: int, write: Any
) -> float:
    """Seconds to write every batch from `connections` connections at once."""
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]

    async def share(conn: asyncpg.Connection, mine: list[FlushBatch]) -> None:
        for b in mine:
            await write(conn, b)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(share(c, batches[n::connections]) for n, c in enumerate(conns)))
        return time.perf_counter() - started
    finally:
        for conn in conns:
            await conn.close()


async def ceiling(dsn: str, messages: list[tuple[str, bytes]], connections: int) -> float:
    """The daemon's own flush statement, straight from asyncpg with rows built beforehand, from
    `connections` connections at once: readings a second."""
    batches, count = _batches(messages)
    return count / await _from_connections(dsn, batches, connections, flush_batch)


async def _bare_write(conn: asyncpg.Connection, batch: FlushBatch) -> None:
    columns: list[Any] = []
    for stream, width in (("meter", 5), ("vehicle", 6)):
        rows = batch.rows[stream]
        columns.extend(list(zip(*rows, strict=True)) if rows else [() for _ in range(width)])
    await conn.execute(BARE_INSERT, *columns)


async def bare_insert(dsn: str, messages: list[tuple[str, bytes]], connections: int) -> float:
    """The physical limit (BARE_TABLES): readings a second."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(BARE_TABLES)
    finally:
        await conn.close()
    batches, count = _batches(messages)
    return count / await _from_connections(dsn, batches, connections, _bare_write)


def _drain_once(
    svc: Services, messages: list[tuple[str, bytes]], total: int, tree: Path | None
) -> dict[str, Any]:
    """A stored backlog drained by one daemon (of this build, or of `tree`'s)."""
    asyncio.run(reset(svc.dsn))
    daemon = Daemon(svc, tree=tree, flush_max_readings=FLUSH_READINGS)
    daemon.start()  # creates the persistent session and its subscriptions
    daemon.stop()
    publish_rate = publish_parallel(svc.broker.port, messages)
    daemon = Daemon(
        svc, tree=tree, flush_max_readings=FLUSH_READINGS, flush_concurrency=FLUSH_CONCURRENCY
    )
    connected_at = daemon.start(until_ready=False)
    box = BoxCpu()
    cpu_before = daemon.cpu_s()
    broker_pid = int(svc.broker.pid_file.read_text().split()[0])
    pg_before, broker_before = postgres_cpu_s(svc.pg), process_cpu_s(broker_pid)
    while True:
        metrics = daemon.metrics()
        if accepted(metrics) >= total:
            break
        time.sleep(0.05)
    drain_s = metrics["energy_ingest_last_commit_unixtime"] - connected_at
    cpu = daemon.cpu_s() - cpu_before
    box_cpu = box.measure()
    # Who spent the machine's CPU on each reading: the daemon, PostgreSQL, the broker. Two
    # cores bound the drain at 2 / (their sum), whatever any one of them does alone.
    each = {
        "daemon": cpu,
        "postgres": postgres_cpu_s(svc.pg) - pg_before,
        "broker": process_cpu_s(broker_pid) - broker_before,
    }
    cpu_us = {f"{who}_cpu_us_per_reading": round(s / total * 1e6, 2) for who, s in each.items()}
    rss = daemon.peak_rss_mb()
    daemon.stop()
    return {
        "readings": total,
        "messages": len(messages),
        "drain_s": round(drain_s, 3),
        "readings_per_s": round(total / drain_s),
        "daemon_cpu_share": round(cpu / drain_s, 3),
        **box_cpu,
        **cpu_us,
        "cores_bound_readings_per_s": round((os.cpu_count() or 1) * total / sum(each.values())),
        "peak_rss_mb": round(rss, 1),
        "mean_flush_readings": round(
            metrics["energy_ingest_flush_readings_sum"]
            / metrics["energy_ingest_flush_readings_count"],
            1,
        ),
        "backlog_publish_msgs_per_s": round(publish_rate),
    }


def drain(
    svc: Services, *, readings: int, array: int, runs: int, compare_with: Path | None = None
) -> Result:
    result = Result(
        "mqtt-drain",
        {
            "readings": readings,
            "array": array,
            "flush_max_readings": FLUSH_READINGS,
            "bare_insert": "one statement per batch of 2,000 into plain tables shaped like the "
            "history (key (device, ts) carrying the summed value), nothing else",
            "before": str(compare_with) if compare_with else None,
        },
    )
    builds: list[tuple[str, Path | None]] = [("after", None)]
    if compare_with is not None:
        builds.insert(0, ("before", compare_with))
    for run in range(runs):
        start = datetime.now(UTC) - timedelta(days=20) + timedelta(hours=run)
        messages = backlog(readings, array, start)
        total = sum(p.count(b'"timestamp"') for _, p in messages)
        limits: dict[str, float] = {}
        pg_us: dict[str, float] = {}
        for connections in (1, FLUSH_CONCURRENCY):
            for name, writer in (("bare", bare_insert), ("flush", ceiling)):
                asyncio.run(reset(svc.dsn))
                pg_before = postgres_cpu_s(svc.pg)
                per_s = asyncio.run(writer(svc.dsn, messages, connections))
                limits[f"{name}_{connections}"] = per_s
                pg_us[name] = round((postgres_cpu_s(svc.pg) - pg_before) / total * 1e6, 2)
        for build, tree in builds:
            measured = _drain_once(svc, messages, total, tree)
            rate = measured["readings_per_s"]
            run_result: dict[str, Any] = {
                "build": build,
                "run": run + 1,
                **measured,
                "bare_insert_1_connection_per_s": round(limits["bare_1"]),
                "bare_insert_per_s": round(limits[f"bare_{FLUSH_CONCURRENCY}"]),
                "ratio_to_bare_insert_1_connection": round(rate / limits["bare_1"], 3),
                "ratio_to_bare_insert": round(rate / limits[f"bare_{FLUSH_CONCURRENCY}"], 3),
                "ceiling_1_connection_per_s": round(limits["flush_1"]),
                "ceiling_readings_per_s": round(limits[f"flush_{FLUSH_CONCURRENCY}"]),
                "ratio_to_ceiling": round(rate / limits[f"flush_{FLUSH_CONCURRENCY}"], 3),
                "bare_insert_postgres_cpu_us_per_reading": pg_us["bare"],
                "ceiling_postgres_cpu_us_per_reading": pg_us["flush"],
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
