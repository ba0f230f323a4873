"""Nothing lost, nothing counted twice: the daemon killed mid-stream, the broker restarted."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import asyncpg
import pytest

from daemon.embedded import EmbeddedMosquitto, EmbeddedPostgres
from simulator.fleet import as_arrays
from tests.conftest import fresh_database
from tests.helpers import eventually, meter_json, minutes_ago
from tests.services import (
    DaemonProcess,
    Publisher,
    database_url,
    running_mosquitto,
    running_postgres,
)

# SOAK_SCALE=10 makes every stream here ten times longer.
SCALE = int(os.environ.get("SOAK_SCALE", "1"))
METERS = 50


def stream_of_readings(prefix: str, per_meter: int) -> list[tuple[str, bytes, float]]:
    start = minutes_ago(per_meter + 1)
    messages = []
    for minute in range(per_meter):
        at = start + timedelta(minutes=minute)
        for m in range(METERS):
            meter = f"{prefix}-{m:03d}"
            kwh = round(0.01 * (m + 1) + 0.001 * minute, 6)
            messages.append((f"meters/{meter}/telemetry", meter_json(meter, at, kwh=kwh), kwh))
    return messages


class BackgroundPublisher(threading.Thread):
    def __init__(self, port: int, messages: list[tuple[str, bytes, float]]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.messages = messages
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            publisher = Publisher(self.port)
            for start in range(0, len(self.messages), 250):
                chunk = self.messages[start : start + 250]
                publisher.publish_all([(topic, payload) for topic, payload, _ in chunk])
                self.sent += len(chunk)
            publisher.close()
        except BaseException as error:  # reported by the test
            self.error = error


async def stored(url: str, prefix: str) -> tuple[int, float]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, coalesce(sum(kwh_consumed_ac), 0) AS kwh "
            "FROM meter_readings WHERE meter_id LIKE $1",
            prefix + "-%",
        )
        return row["n"], row["kwh"]
    finally:
        await conn.close()


async def wait_until_all_stored(url: str, prefix: str, expected: int) -> int:
    """Wait for `expected` readings of `prefix`; returns how many are stored (more = bug)."""

    async def enough() -> bool:
        return (await stored(url, prefix))[0] >= expected

    await eventually(enough, timeout_s=90)
    return (await stored(url, prefix))[0]


@pytest.mark.soak
async def test_daemon_killed_mid_stream_loses_nothing(
    postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto
) -> None:
    url = await fresh_database(postgres)
    prefix = f"K{uuid.uuid4().hex[:6]}"
    messages = stream_of_readings(prefix, per_meter=100 * SCALE)
    daemon = DaemonProcess(database_url=url, mqtt_url=mosquitto.url).start()
    publisher = BackgroundPublisher(mosquitto.port, messages)
    publisher.start()
    try:
        for kill_at in (len(messages) // 4, len(messages) // 2):
            deadline = time.monotonic() + 60
            while publisher.sent < kill_at and time.monotonic() < deadline:
                time.sleep(0.01)
            daemon.kill()
            time.sleep(0.3)  # the broker queues for the persistent session meanwhile
            daemon.start()
        publisher.join(timeout=120)
        assert publisher.error is None and publisher.sent == len(messages)

        assert await wait_until_all_stored(url, prefix, len(messages)) == len(messages)
        _, kwh = await stored(url, prefix)
        assert kwh == pytest.approx(sum(k for _, _, k in messages), abs=1e-6)
    finally:
        assert daemon.stop() == 0, daemon.log()


@pytest.fixture
def private_broker() -> Iterator[EmbeddedMosquitto]:
    with running_mosquitto() as broker:
        yield broker


@pytest.mark.soak
async def test_backlog_queued_while_the_daemon_is_down_survives_a_broker_restart(
    postgres: EmbeddedPostgres, private_broker: EmbeddedMosquitto
) -> None:
    url = await fresh_database(postgres)
    prefix = f"B{uuid.uuid4().hex[:6]}"
    messages = stream_of_readings(prefix, per_meter=40 * SCALE)
    daemon = DaemonProcess(database_url=url, mqtt_url=private_broker.url).start()
    assert daemon.stop() == 0  # the broker now holds a persistent session for the daemon
    publisher = Publisher(private_broker.port)
    publisher.publish_all([(topic, payload) for topic, payload, _ in messages])
    publisher.close()
    private_broker.stop()  # a clean stop writes the queued messages to disk
    private_broker.start()
    daemon.start()
    try:
        assert await wait_until_all_stored(url, prefix, len(messages)) == len(messages)
    finally:
        assert daemon.stop() == 0, daemon.log()


@pytest.mark.soak
async def test_database_outage_holds_a_bounded_buffer_and_loses_nothing(
    mosquitto: EmbeddedMosquitto,
) -> None:
    prefix = f"D{uuid.uuid4().hex[:6]}"
    messages = stream_of_readings(prefix, per_meter=20 * SCALE)
    with running_postgres() as pg:
        url = database_url(pg, "energy")
        daemon = DaemonProcess(
            database_url=url, mqtt_url=mosquitto.url, buffer_max_readings=100
        ).start()
        try:
            pg.stop()
            publisher = Publisher(mosquitto.port)
            publisher.publish_all([(topic, payload) for topic, payload, _ in messages])
            publisher.close()
            health = daemon.get("/health")
            assert health.status_code == 503
            body = health.json()
            assert not body["database"]["ok"]
            assert 0 < body["buffer"]["depth"] <= 100 + 1  # at most one message past the bound
            pg.start()
            assert await wait_until_all_stored(url, prefix, len(messages)) == len(messages)
        finally:
            assert daemon.stop() == 0, daemon.log()


@pytest.mark.soak
async def test_a_backlog_of_gateway_arrays_bigger_than_the_buffer_drains_once(
    postgres: EmbeddedPostgres, private_broker: EmbeddedMosquitto
) -> None:
    """Queued arrays fill the buffer before the broker's SUBACK arrives: the daemon must keep
    its connection (no reconnect loop, so no redelivered copies) and store everything."""
    url = await fresh_database(postgres)
    prefix = f"G{uuid.uuid4().hex[:6]}"
    per_meter = 60
    readings = stream_of_readings(prefix, per_meter=per_meter * SCALE)
    arrays = as_arrays([(topic, payload) for topic, payload, _ in readings], per_meter * SCALE)
    daemon = DaemonProcess(database_url=url, mqtt_url=private_broker.url, buffer_max_readings=500)
    daemon.start()
    assert daemon.stop() == 0
    publisher = Publisher(private_broker.port)
    publisher.publish_all(arrays)
    publisher.close()
    daemon.start()
    try:
        assert await wait_until_all_stored(url, prefix, len(readings)) == len(readings)
        metrics = daemon.get("/metrics").text
        assert 'outcome="duplicate"' not in metrics, "messages were delivered twice"
        assert "connection lost" not in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()
