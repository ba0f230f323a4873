"""Readings over MQTT, through a real Mosquitto, into a real PostgreSQL (SPEC §2, §3, §7)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import orjson
import pytest

from daemon.services import EmbeddedMosquitto
from tests.helpers import eventually, iso, meter_json, minutes_ago, vehicle_json
from tests.services import DaemonProcess, Publisher, running_mosquitto


@pytest.fixture
def publisher(mosquitto: EmbeddedMosquitto) -> Iterator[Publisher]:
    pub = Publisher(mosquitto.port)
    yield pub
    pub.close()


@pytest.fixture
async def db(module_db: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(module_db)
    yield conn
    await conn.close()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def count(db: asyncpg.Connection, table: str, column: str, device: str) -> int:
    value: int = await db.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", device)
    return value


def mqtt_count(daemon: DaemonProcess, outcome: str) -> float:
    """A daemon's counter of meter readings over MQTT with this outcome, from /metrics."""
    prefix = f'energy_ingest_readings_total{{outcome="{outcome}",stream="meter",transport="mqtt"}}'
    for line in daemon.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


async def rejections_for(db: asyncpg.Connection, topic: str) -> list[str]:
    rows = await db.fetch("SELECT reason FROM rejections WHERE topic_or_route = $1", topic)
    return [r["reason"] for r in rows]


async def test_published_readings_land_in_history_and_latest(
    daemon: DaemonProcess, publisher: Publisher, db: asyncpg.Connection
) -> None:
    meter, vehicle = new_id("M"), new_id("V")
    at = minutes_ago(1)
    publisher.publish_all(
        [
            (f"meters/{meter}/telemetry", meter_json(meter, at, kwh=2.5)),
            (f"vehicles/{vehicle}/telemetry", vehicle_json(vehicle, at, soc=61.5)),
        ]
    )

    async def meter_status() -> dict[str, Any] | None:
        response = await asyncio.to_thread(daemon.get, f"/v1/status/meter/{meter}")
        return response.json() if response.status_code == 200 else None

    body = await eventually(meter_status)
    assert body["kwhConsumedAc"] == 2.5 and body["timestamp"] == at.isoformat()
    vehicle_body = (await asyncio.to_thread(daemon.get, f"/v1/status/vehicle/{vehicle}")).json()
    assert vehicle_body["soc"] == 61.5
    assert await count(db, "meter_readings", "meter_id", meter) == 1
    assert await count(db, "vehicle_readings", "vehicle_id", vehicle) == 1


async def test_a_message_delivered_twice_is_stored_once(
    daemon: DaemonProcess, publisher: Publisher, db: asyncpg.Connection
) -> None:
    meter = new_id("M")
    payload = meter_json(meter, minutes_ago(2))
    publisher.publish_all([(f"meters/{meter}/telemetry", payload)] * 3)
    # A later reading after the copies: once it is stored, the copies have been handled.
    later = minutes_ago(1)
    publisher.publish_all([(f"meters/{meter}/telemetry", meter_json(meter, later))])
    await eventually(
        lambda: db.fetchval(
            "SELECT ts FROM meter_latest WHERE meter_id = $1 AND ts = $2", meter, later
        )
    )
    assert await count(db, "meter_readings", "meter_id", meter) == 2


async def test_late_reading_does_not_overwrite_latest(
    daemon: DaemonProcess, publisher: Publisher, db: asyncpg.Connection
) -> None:
    vehicle = new_id("V")
    topic = f"vehicles/{vehicle}/telemetry"
    newest = minutes_ago(1)
    publisher.publish_all([(topic, vehicle_json(vehicle, newest, soc=80))])
    await eventually(lambda: count(db, "vehicle_readings", "vehicle_id", vehicle))
    publisher.publish_all([(topic, vehicle_json(vehicle, minutes_ago(45), soc=20))])

    async def both_stored() -> bool:
        return await count(db, "vehicle_readings", "vehicle_id", vehicle) == 2

    await eventually(both_stored)
    latest = await db.fetchrow("SELECT ts, soc FROM vehicle_latest WHERE vehicle_id = $1", vehicle)
    assert (latest["ts"], latest["soc"]) == (newest, 80.0)


async def test_a_gateway_array_stores_each_reading(
    daemon: DaemonProcess, publisher: Publisher, db: asyncpg.Connection
) -> None:
    meter = new_id("M")
    readings = [orjson.loads(meter_json(meter, minutes_ago(m))) for m in range(1, 61)]
    readings.append({**readings[0], "voltage": 5000, "timestamp": iso(minutes_ago(90))})
    topic = f"meters/{meter}/telemetry"
    publisher.publish_all([(topic, orjson.dumps(readings))])

    async def sixty() -> bool:
        return await count(db, "meter_readings", "meter_id", meter) == 60

    await eventually(sixty)
    reasons = await eventually(lambda: rejections_for(db, topic))
    assert reasons == [
        "1 of 61 readings rejected: reading 60: voltage: Input should be less than or equal to 1000"
    ]


@pytest.mark.parametrize(
    ("payload", "reason_words"),
    [
        (b"this is not json", "not valid JSON"),
        (
            b'{"meterId": "someone-else", "kwhConsumedAc": 1, "voltage": 230, '
            b'"timestamp": "2026-01-01T00:00:00Z"}',
            "does not match the topic",
        ),
        (None, "voltage: Input should be less than or equal to 1000"),
        (b'{"meterId": "X"}', "kwhConsumedAc: Field required"),
    ],
)
async def test_bad_messages_are_recorded_with_a_reason_and_the_daemon_stays_up(
    daemon: DaemonProcess,
    publisher: Publisher,
    db: asyncpg.Connection,
    payload: bytes | None,
    reason_words: str,
) -> None:
    meter = new_id("M")
    topic = f"meters/{meter}/telemetry"
    if payload is None:
        payload = meter_json(meter, minutes_ago(1), voltage=1200)
    publisher.publish_all([(topic, payload)])
    reasons = await eventually(lambda: rejections_for(db, topic))
    assert len(reasons) == 1 and reason_words in reasons[0]
    listed = (await asyncio.to_thread(daemon.get, "/v1/rejections", source="mqtt")).json()
    mine = [r for r in listed["rejections"] if r["topicOrRoute"] == topic]
    assert mine and mine[0]["payload"] == payload.decode()[:2048]
    assert (await asyncio.to_thread(daemon.get, "/health")).status_code == 200
    publisher.publish_all([(topic, meter_json(meter, minutes_ago(1)))])
    await eventually(lambda: count(db, "meter_readings", "meter_id", meter))


async def test_qos0_readings_are_accepted_too(
    daemon: DaemonProcess, publisher: Publisher, db: asyncpg.Connection
) -> None:
    meter = new_id("M")
    publisher.publish_all([(f"meters/{meter}/telemetry", meter_json(meter, minutes_ago(1)))], qos=0)
    await eventually(lambda: count(db, "meter_readings", "meter_id", meter))


@pytest.fixture
def private_broker() -> Iterator[EmbeddedMosquitto]:
    """A broker of this test's own: no other daemon subscribed to it."""
    with running_mosquitto() as broker:
        yield broker


async def test_two_daemons_sharing_a_group_store_each_reading_once(
    module_db: str, private_broker: EmbeddedMosquitto, db: asyncpg.Connection
) -> None:
    replicas = [
        DaemonProcess(database_url=module_db, mqtt_url=private_broker.url, mqtt_shared_group="g1")
        for _ in range(2)
    ]
    for replica in replicas:
        replica.start()
    try:
        meters = [new_id("S") for _ in range(20)]
        messages = [
            (f"meters/{m}/telemetry", meter_json(m, minutes_ago(minute)))
            for minute in range(1, 51)
            for m in meters
        ]
        pub = Publisher(private_broker.port)
        pub.publish_all(messages)
        pub.close()

        async def all_stored() -> bool:
            n = await db.fetchval(
                "SELECT count(*) FROM meter_readings WHERE meter_id = ANY($1)", meters
            )
            return bool(n >= len(messages))

        await eventually(all_stored)
        n = await db.fetchval(
            "SELECT count(*) FROM meter_readings WHERE meter_id = ANY($1)", meters
        )
        assert n == len(messages)

        # Each message went to one replica only: both worked, and nobody saw a duplicate.
        # (The counters move just after the commit the database query saw.)
        async def counted() -> list[float] | None:
            accepted = [mqtt_count(r, "accepted") for r in replicas]
            return accepted if sum(accepted) >= len(messages) else None

        accepted = await eventually(counted, timeout_s=5)
        assert all(a > 0 for a in accepted) and sum(accepted) == len(messages), accepted
        assert sum(mqtt_count(r, "duplicate") for r in replicas) == 0
    finally:
        for replica in replicas:
            assert replica.stop() == 0, replica.log()


POISON = [
    # Valid ISO 8601, past year 9999 once in UTC: this one stopped all MQTT ingestion.
    b'{"meterId": "%s", "kwhConsumedAc": 1, "voltage": 230, '
    b'"timestamp": "9999-12-31T23:59:59-01:00"}',
    b'{"meterId": "%s", "kwhConsumedAc": 1, "voltage": 230, '
    b'"timestamp": "0001-01-01T00:00:00+01:00"}',
    b"\xff\xfe not UTF-8 %s",
    b'{"meterId": "%s\x00", "voltage": "\x00"}',
    b"[" * 5000 + b"%s",
    b'[1, 2, {"meterId": "%s"}, "x"]',
    b'{"meterId": "%s", "kwhConsumedAc": NaN, "voltage": Infinity, "timestamp": 1}',
    b'{"meterId": "%s", "kwhConsumedAc": 1e999, "voltage": -0.0, "timestamp": "2026-13-45T00:00Z"}',
]


async def test_poison_messages_among_valid_ones_never_drop_the_connection(
    daemon: DaemonProcess, publisher: Publisher, db: asyncpg.Connection
) -> None:
    meter = new_id("P")
    topic = f"meters/{meter}/telemetry"
    disconnects_before = metric_sum(daemon, "energy_ingest_mqtt_disconnects_total")
    messages: list[tuple[str, bytes | str]] = []
    for n, poison in enumerate(POISON):
        messages.append((topic, meter_json(meter, minutes_ago(n + 1))))
        messages.append((topic, poison.replace(b"%s", meter.encode())))
    messages.append((topic, meter_json(meter, minutes_ago(len(POISON) + 1))))
    publisher.publish_all(messages)

    async def all_valid_stored() -> bool:
        return await count(db, "meter_readings", "meter_id", meter) == len(POISON) + 1

    await eventually(all_valid_stored)

    async def every_poison_rejected() -> list[str] | None:
        reasons = await rejections_for(db, topic)
        return reasons if len(reasons) >= len(POISON) else None

    reasons = await eventually(every_poison_rejected)
    assert any("outside the calendar" in r for r in reasons)
    assert metric_sum(daemon, "energy_ingest_mqtt_disconnects_total") == disconnects_before
    assert (await asyncio.to_thread(daemon.get, "/health")).status_code == 200


def metric_sum(daemon: DaemonProcess, prefix: str) -> float:
    return sum(
        float(line.split()[-1])
        for line in daemon.get("/metrics").text.splitlines()
        if line.startswith(prefix)
    )


async def test_a_retained_message_is_handled_once_not_at_every_restart(
    module_db: str, private_broker: EmbeddedMosquitto, db: asyncpg.Connection
) -> None:
    """The daemon subscribes with Retain Handling 2: a retained reading reaches it once,
    when it is published, and is not sent again at each subscribe (it used to count as a
    duplicate, and an invalid one as a new rejection, at every restart)."""
    daemon = DaemonProcess(database_url=module_db, mqtt_url=private_broker.url).start()
    meter = new_id("R")
    topic = f"meters/{meter}/telemetry"
    pub = Publisher(private_broker.port)
    for payload in (meter_json(meter, minutes_ago(1)), b'{"meterId": "broken"}'):
        pub.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    pub.close()
    try:
        await eventually(lambda: count(db, "meter_readings", "meter_id", meter))
        await eventually(lambda: rejections_for(db, topic))
        for _ in range(2):
            assert daemon.stop() == 0, daemon.log()
            daemon.start()
            await asyncio.sleep(1.0)
            assert mqtt_count(daemon, "duplicate") == 0
            assert mqtt_count(daemon, "accepted") == 0
        assert len(await rejections_for(db, topic)) == 1
        assert await count(db, "meter_readings", "meter_id", meter) == 1
    finally:
        assert daemon.stop() == 0, daemon.log()


async def test_the_daemon_folds_what_it_stored_into_the_hourly_rollups(
    daemon: DaemonProcess, publisher: Publisher, db: asyncpg.Connection
) -> None:
    """The flush leaves deltas; the daemon's housekeeping folds them in by itself
    (ROLLUP_FOLD_S): the roll-ups alone then count every reading, and no delta is left."""
    meter = new_id("M")
    publisher.publish_all(
        [
            (f"meters/{meter}/telemetry", meter_json(meter, minutes_ago(m), kwh=0.5))
            for m in (1, 2, 3)
        ]
    )

    async def folded() -> bool:
        rolled = await db.fetchval(
            "SELECT sum(readings) FROM meter_hourly WHERE meter_id = $1", meter
        )
        waiting = await db.fetchval(
            "SELECT count(*) FROM meter_hour_deltas WHERE meter_id = $1", meter
        )
        return bool(rolled == 3 and waiting == 0)

    await eventually(folded, timeout_s=20)
    assert mqtt_count(daemon, "accepted") >= 3
    folded_total = [
        float(line.split()[-1])
        for line in daemon.get("/metrics").text.splitlines()
        if line.startswith("energy_ingest_rollup_deltas_folded_total")
    ]
    assert folded_total and folded_total[0] >= 1
