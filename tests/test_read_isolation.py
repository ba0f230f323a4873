"""Operators' reads never slow ingestion (SPEC §6): fleet readers looping on the heaviest page
while meters publish; a read past the server-side statement timeout; analytics beyond the
admission cap; /health telling a busy database from a down one. Real PostgreSQL, Mosquitto
and daemon."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from daemon.services import EmbeddedMosquitto, EmbeddedPostgres
from db.rollup import rebuild
from simulator.benchkit import histogram_quantile, parse_metrics
from tests.conftest import fresh_database
from tests.helpers import eventually, meter_json, minutes_ago
from tests.services import DaemonProcess, Publisher, wait_until
from tests.streams import stream_of_readings, wait_until_all_stored

VEHICLES = 3000
HOURS = 24
STEP = timedelta(minutes=10)

# A fleet loaded in SQL (as the fleet benchmark does), in time order, each vehicle linked to
# its meter, the roll-ups summed from it.
LOAD = """
INSERT INTO meter_readings (meter_id, ts, kwh_consumed_ac, voltage, received_at)
SELECT 'IM-' || d, t, 0.1, 230, t
FROM generate_series($2::timestamptz, $3::timestamptz, $4::interval) t
CROSS JOIN generate_series(1, $1::int) d;
INSERT INTO vehicle_readings (vehicle_id, ts, soc, kwh_delivered_dc, battery_temp, received_at)
SELECT 'IV-' || d, t, 50, 0.1 * (0.7 + (d % 25) * 0.01), 20, t
FROM generate_series($2::timestamptz, $3::timestamptz, $4::interval) t
CROSS JOIN generate_series(1, $1::int) d;
INSERT INTO charging_sessions (vehicle_id, meter_id, started_at)
SELECT 'IV-' || d, 'IM-' || d, $2::timestamptz - interval '1 hour'
FROM generate_series(1, $1::int) d
"""


@pytest.fixture(scope="module")
async def fleet_db(postgres: EmbeddedPostgres) -> str:
    url = await fresh_database(postgres)
    conn = await asyncpg.connect(url)
    try:
        end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
        start = end - timedelta(hours=HOURS)
        for statement in LOAD.strip().split(";\n"):
            arguments = (VEHICLES, start, end, STEP) if "generate_series($2" in statement else ()
            await conn.execute(statement, *arguments or (VEHICLES, start))
        await rebuild(conn, start, end + STEP)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return url


def widest_window() -> dict[str, str]:
    end = datetime.now(UTC)
    start = end - timedelta(days=31)
    return {"startTime": start.isoformat(), "endTime": end.isoformat()}


class Readers:
    """Operators looping on a route until stopped; counts answers by status."""

    def __init__(self, base_url: str, path: str, params: dict[str, Any], count: int) -> None:
        self.statuses: dict[int, int] = {}
        self.slowest_s = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(base_url, path, params), daemon=True)
            for _ in range(count)
        ]

    def _loop(self, base_url: str, path: str, params: dict[str, Any]) -> None:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                answer = client.get(path, params=params)
                with self._lock:
                    self.statuses[answer.status_code] = self.statuses.get(answer.status_code, 0) + 1
                    self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                if answer.status_code == 503:
                    time.sleep(0.05)

    def __enter__(self) -> Readers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)


class HealthWatch(threading.Thread):
    def __init__(self, daemon: DaemonProcess) -> None:
        super().__init__(daemon=True)
        self.url = daemon.base_url + "/health"
        self.answers: list[int] = []
        self.slowest_s = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._halt.is_set():
                started = time.monotonic()
                self.answers.append(client.get(self.url).status_code)
                self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                time.sleep(0.1)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(30)


def paced(port: int, messages: list[tuple[str, bytes, float]], per_second: int) -> None:
    publisher = Publisher(port)
    try:
        started = time.monotonic()
        for n in range(0, len(messages), per_second // 10):
            chunk = messages[n : n + per_second // 10]
            publisher.publish_all([(topic, payload) for topic, payload, _ in chunk])
            time.sleep(max(0.0, started + (n + len(chunk)) / per_second - time.monotonic()))
    finally:
        publisher.close()


@pytest.mark.soak
async def test_fleet_readers_during_ingestion_leave_lag_bounded_and_health_green(
    fleet_db: str, mosquitto: EmbeddedMosquitto, record: Callable[..., None]
) -> None:
    daemon = DaemonProcess(database_url=fleet_db, mqtt_url=mosquitto.url).start()
    prefix = f"IR{uuid.uuid4().hex[:6]}"
    messages = stream_of_readings(prefix, per_meter=60)  # 3,000 messages, 300 a second
    watch = HealthWatch(daemon)
    try:
        params = {**widest_window(), "limit": 10_000}
        with (
            Readers(daemon.base_url, "/v1/analytics/fleet", params, 10) as fleet_readers,
            Readers(daemon.base_url, "/v1/analytics/fleet", {**params, "format": "csv"}, 2) as csv,
        ):
            watch.start()
            await asyncio.to_thread(paced, mosquitto.port, messages, 300)
            published_at = time.monotonic()
            stored = await wait_until_all_stored(fleet_db, prefix, len(messages), timeout_s=30)
            stored_after_s = time.monotonic() - published_at
        watch.stop()
        metrics = parse_metrics(daemon.get("/metrics").text)
        lag_p99 = histogram_quantile(metrics, "energy_ingest_lag_seconds", 0.99, 'since="receive"')
        loop_max = metrics["energy_ingest_event_loop_lag_max_seconds"]
        assert stored == len(messages)
        assert set(watch.answers) == {200}, watch.answers
        assert fleet_readers.statuses.get(200, 0) > 0 and csv.statuses.get(200, 0) > 0
        assert set(fleet_readers.statuses) <= {200, 503}, fleet_readers.statuses
        assert lag_p99 is not None and lag_p99 < 2.0, lag_p99
        assert stored_after_s < 10
        record(
            vehicles=VEHICLES,
            readers=12,
            fleet_answers=fleet_readers.statuses,
            csv_answers=csv.statuses,
            receive_to_commit_p99_s=round(lag_p99, 3),
            stored_after_publisher_end_s=round(stored_after_s, 2),
            event_loop_lag_max_s=round(loop_max, 3),
            slowest_health_s=round(watch.slowest_s, 3),
        )
    finally:
        watch.stop()
        assert daemon.stop() == 0, daemon.log()


@pytest.fixture
def locked_sessions(fleet_db: str) -> Iterator[Callable[[], None]]:
    """charging_sessions locked by another client (ACCESS EXCLUSIVE): every analytics read
    waits on it, ingestion does not (the flush never touches sessions). Yields the release."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(fleet_db))
    transaction = conn.transaction()
    loop.run_until_complete(transaction.start())
    loop.run_until_complete(conn.execute("LOCK TABLE charging_sessions IN ACCESS EXCLUSIVE MODE"))
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            loop.run_until_complete(transaction.rollback())

    try:
        yield release
    finally:
        release()
        loop.run_until_complete(conn.close())
        loop.close()


def test_a_read_past_the_statement_timeout_is_503_and_ingestion_goes_on(
    fleet_db: str, mosquitto: EmbeddedMosquitto, locked_sessions: Callable[[], None]
) -> None:
    daemon = DaemonProcess(
        database_url=fleet_db, mqtt_url=mosquitto.url, analytics_statement_timeout_s=0.5
    ).start()
    try:
        started = time.monotonic()
        answer = daemon.get("/v1/analytics/fleet")
        took = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert "ANALYTICS_STATEMENT_TIMEOUT_S" in answer.json()["detail"]
        assert int(answer.headers["Retry-After"]) > 0
        assert 0.4 < took < 5, took
        stored = httpx.post(
            daemon.base_url + "/v1/ingestion/meter",
            content=meter_json("ST-1", minutes_ago(1)),
            timeout=10,
        )
        assert stored.status_code == 201
        assert daemon.get("/health").status_code == 200
        metrics = daemon.get("/metrics").text
        assert 'energy_ingest_reads_refused_total{reason="statement_timeout"} 1.0' in metrics
        locked_sessions()
        assert daemon.get("/v1/analytics/fleet").status_code == 200
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_analytics_beyond_the_cap_wait_their_turn_then_get_503(
    fleet_db: str, mosquitto: EmbeddedMosquitto, locked_sessions: Callable[[], None]
) -> None:
    daemon = DaemonProcess(
        database_url=fleet_db,
        mqtt_url=mosquitto.url,
        analytics_max_concurrent=1,
        read_queue_timeout_s=0.3,
        analytics_statement_timeout_s=4,
    ).start()
    try:
        first: list[httpx.Response] = []
        running = threading.Thread(
            target=lambda: first.append(daemon.get("/v1/analytics/performance/IV-1"))
        )
        running.start()
        time.sleep(0.5)  # it holds the one turn, waiting on the lock
        for path in ("/v1/analytics/fleet", "/v1/analytics/performance/IV-2/series"):
            started = time.monotonic()
            answer = daemon.get(path)
            took = time.monotonic() - started
            assert answer.status_code == 503, answer.text
            assert "ANALYTICS_MAX_CONCURRENT" in answer.json()["detail"]
            assert answer.headers["Retry-After"] == "1"
            assert 0.25 < took < 2, took
        # Reads that are not analytics, ingestion and /health go on meanwhile.
        assert daemon.get("/v1/rejections").status_code == 200
        assert daemon.get("/health").status_code == 200
        posted = httpx.post(
            daemon.base_url + "/v1/ingestion/meter",
            content=meter_json("CAP-1", minutes_ago(1)),
            timeout=10,
        )
        assert posted.status_code == 201
        locked_sessions()
        running.join(10)
        assert first[0].status_code == 200, first[0].text
        wait_until(lambda: daemon.get("/v1/analytics/fleet").status_code == 200, 10)
    finally:
        assert daemon.stop() == 0, daemon.log()


def _health_backend(url: str) -> int:
    async def find() -> int:
        conn = await asyncpg.connect(url)
        try:
            pid = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'energy-ingest-health'"
                " AND datname = current_database()"
            )
            assert pid is not None
            return int(pid)
        finally:
            await conn.close()

    return asyncio.run(find())


async def test_health_tells_a_busy_database_from_a_down_one(
    postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto
) -> None:
    url = await fresh_database(postgres)
    daemon = DaemonProcess(database_url=url, mqtt_url=mosquitto.url).start()
    try:
        backend = await asyncio.to_thread(_health_backend, url)
        os.kill(backend, signal.SIGSTOP)  # PostgreSQL answers nothing on that connection
        try:

            async def busy() -> dict[str, Any] | None:
                answer = await asyncio.to_thread(daemon.get, "/health")
                body: dict[str, Any] = answer.json()
                return body if body["database"]["state"] == "busy" else None

            body = await eventually(busy, timeout_s=10)
            assert body["status"] == "ok" and body["database"]["ok"]  # busy is not down
            assert "busy" in body["database"]["detail"]
        finally:
            os.kill(backend, signal.SIGCONT)
        answer = await asyncio.to_thread(daemon.get, "/health")
        assert answer.status_code == 200
        name = url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
        try:
            # No connection to this database any more (as a server gone for it would do).
            await admin.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                name,
            )

            async def down() -> dict[str, Any] | None:
                answer = await asyncio.to_thread(daemon.get, "/health")
                body: dict[str, Any] = answer.json()
                return body if answer.status_code == 503 else None

            body = await eventually(down, timeout_s=10)
            assert body["database"]["state"] in ("down", "refusing writes"), body
            assert not body["database"]["ok"]
        finally:
            await admin.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
            await admin.close()

        async def back() -> bool:
            answer = await asyncio.to_thread(daemon.get, "/health")
            return answer.status_code == 200

        await eventually(back, timeout_s=30)
    finally:
        assert daemon.stop() == 0, daemon.log()
