"""Nothing lost, nothing counted twice: the daemon killed mid-stream, the broker restarted."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from daemon.services import EmbeddedMosquitto, EmbeddedPostgres
from simulator.fleet import as_arrays
from tests.conftest import fresh_database
from tests.services import (
    DaemonProcess,
    Publisher,
    database_url,
    running_mosquitto,
    running_postgres,
)
from tests.streams import (
    BackgroundPublisher,
    stored,
    stream_of_readings,
    tally,
    wait_until_all_stored,
)

# SOAK_SCALE=10 makes every stream here ten times longer.
SCALE = int(os.environ.get("SOAK_SCALE", "1"))
METERS = 50


@pytest.mark.soak
async def test_daemon_killed_mid_stream_loses_nothing(
    postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto, record: Callable[..., None]
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
        record(**await tally(url, prefix, messages), kills=2)
    finally:
        assert daemon.stop() == 0, daemon.log()


@pytest.fixture
def private_broker() -> Iterator[EmbeddedMosquitto]:
    with running_mosquitto() as broker:
        yield broker


@pytest.mark.soak
async def test_backlog_queued_while_the_daemon_is_down_survives_a_broker_restart(
    postgres: EmbeddedPostgres, private_broker: EmbeddedMosquitto, record: Callable[..., None]
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
        record(**await tally(url, prefix, messages))
    finally:
        assert daemon.stop() == 0, daemon.log()


@pytest.mark.soak
async def test_database_outage_holds_a_bounded_buffer_and_loses_nothing(
    mosquitto: EmbeddedMosquitto, record: Callable[..., None]
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
            record(
                **await tally(url, prefix, messages), buffer_depth_at_most=body["buffer"]["depth"]
            )
        finally:
            assert daemon.stop() == 0, daemon.log()


@pytest.mark.soak
async def test_a_backlog_of_gateway_arrays_bigger_than_the_buffer_drains_once(
    postgres: EmbeddedPostgres, private_broker: EmbeddedMosquitto, record: Callable[..., None]
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
        record(**await tally(url, prefix, readings), messages=len(arrays))
        metrics = daemon.get("/metrics").text
        assert 'outcome="duplicate"' not in metrics, "messages were delivered twice"
        assert "connection lost" not in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()
