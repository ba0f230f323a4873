"""Hostile input (SPEC §2-§4): a corpus of MQTT payloads and HTTP bodies that firmware bugs
and attackers send. Each is rejected with a reason a person can act on, never a 5xx other
than 503; valid readings beside them are stored; the daemon's memory stays bounded; and the
record of rejections stays within REJECTIONS_MAX_ROWS under a flood, its drops counted."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from daemon.services import EmbeddedMosquitto
from simulator.publisher import RawPublisher
from tests.helpers import eventually, iso, meter_json, minutes_ago
from tests.services import DaemonProcess

KEEP_REJECTIONS = 500
RSS_CEILING_MB = 350


def corpus(meter: str) -> dict[str, bytes]:
    now = iso(minutes_ago(1))
    good = {"meterId": meter, "kwhConsumedAc": 1.0, "voltage": 230.0, "timestamp": now}

    def reading(**changes: object) -> bytes:
        return orjson.dumps({**good, **changes})

    return {
        "non-UTF-8": b"\xff\xfe\xfa" + reading()[3:],
        "NUL bytes": reading(meterId="M\x00", voltage="\x00"),
        "deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "deep objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "array of 200,000 non-objects": b"[" + b"1," * 199_999 + b"1]",
        "array of 2,000,000 non-objects (4 MB)": b"[" + b"1," * 1_999_999 + b"1]",
        "NaN and Infinity": reading()[:-1] + b', "kwhConsumedAc": NaN, "voltage": Infinity}',
        "numbers as strings": reading(kwhConsumedAc="1.5", voltage="230"),
        "booleans": reading(kwhConsumedAc=True, voltage=False),
        "duplicate keys": reading()[:-1] + b', "voltage": 5000}',
        "calendar edge, year 9999": reading(timestamp="9999-12-31T23:59:59-01:00"),
        "calendar edge, year 1": reading(timestamp="0001-01-01T00:00:00+01:00"),
        "epoch number timestamp": reading(timestamp=1_764_000_000),
        "absurd energy": reading(kwhConsumedAc=1.7e308),
        "negative zero and denormals": reading(kwhConsumedAc=-0.0, voltage=5e-324),
        "integer past 64 bits": reading()[:-1] + b', "voltage": 100000000000000000000000}',
        "huge string field": reading(meterId="M" * 1_000_000),
        "empty": b"",
        "whitespace": b"   \n\t ",
        "a bare string": b'"meter"',
        "null": b"null",
        "empty array": b"[]",
        "id of another device": reading(meterId="someone-else"),
    }


@pytest.fixture(scope="module")
def hostile_daemon(module_db: str, mosquitto: EmbeddedMosquitto) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(
        database_url=module_db,
        mqtt_url=mosquitto.url,
        rejections_max_rows=KEEP_REJECTIONS,
        max_body_bytes=8 * 1024 * 1024,
        max_batch_readings=2_000_000,
    ).start()
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def peak_rss_mb(daemon: DaemonProcess) -> float:
    assert daemon.process is not None
    status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


async def test_hostile_mqtt_payloads_are_rejected_and_valid_ones_beside_them_stored(
    hostile_daemon: DaemonProcess,
    mosquitto: EmbeddedMosquitto,
    module_db: str,
    record: Callable[..., None],
) -> None:
    meter = f"H-{uuid.uuid4().hex[:6]}"
    topic = f"meters/{meter}/telemetry"
    messages: list[tuple[str, bytes]] = []
    for n, payload in enumerate(corpus(meter).values()):
        messages.append((topic, meter_json(meter, minutes_ago(n + 2))))
        messages.append((topic, payload))
    publisher = RawPublisher("127.0.0.1", mosquitto.port, client_id=f"hostile-{meter}")
    publisher.publish_many(messages)
    publisher.close()
    conn = await asyncpg.connect(module_db)
    try:
        # One valid reading before each hostile one, and "negative zero and denormals",
        # which is valid too (0 kWh; 5e-324 V).
        expected = len(corpus(meter)) + 1

        async def all_valid_stored() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM meter_readings WHERE meter_id = $1", meter
            )
            return bool(n == expected)

        await eventually(all_valid_stored, timeout_s=60)
        reasons = await conn.fetch(
            "SELECT reason, length(payload) AS size FROM rejections WHERE topic_or_route = $1",
            topic,
        )
    finally:
        await conn.close()
    assert len(reasons) == len(corpus(meter)) - 1
    for row in reasons:
        assert row["reason"] and len(row["reason"]) < 4096
        assert row["size"] <= 2048 + 1
    assert hostile_daemon.get("/health").status_code == 200
    assert peak_rss_mb(hostile_daemon) < RSS_CEILING_MB
    record(
        hostile_messages=len(corpus(meter)),
        payload_bytes=sum(len(p) for p in corpus(meter).values()),
        rejection_records=len(reasons),
        valid_stored=expected,
        peak_rss_mb=round(peak_rss_mb(hostile_daemon), 1),
    )


ROUTES = [
    "/v1/ingestion/meter",
    "/v1/ingestion",
    "/v1/telemetry/meter",
    "/v1/ingestion/meter/batch",
]


async def test_hostile_http_bodies_get_4xx_with_a_reason_never_a_5xx(
    hostile_daemon: DaemonProcess, record: Callable[..., None]
) -> None:
    meter = f"HH-{uuid.uuid4().hex[:6]}"
    answers: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=hostile_daemon.base_url, timeout=60) as client:
        for route in ROUTES:
            for name, body in corpus(meter).items():
                if route.endswith("/batch"):
                    body = b'{"readings": [' + body + b"]}"
                response = await client.post(route, content=body)
                assert 400 <= response.status_code < 500 or response.status_code in (201, 503), (
                    route,
                    name,
                    response.status_code,
                    response.text[:300],
                )
                if response.status_code >= 400:
                    detail = response.json()["detail"]
                    assert isinstance(detail, list), (route, name, response.status_code, detail)
                    assert detail and all(p["message"] for p in detail), (route, name)
                answers[response.status_code] = answers.get(response.status_code, 0) + 1
    assert peak_rss_mb(hostile_daemon) < RSS_CEILING_MB
    record(answers=answers, peak_rss_mb=round(peak_rss_mb(hostile_daemon), 1))


async def test_a_flood_of_rejections_keeps_the_record_bounded(
    hostile_daemon: DaemonProcess,
    mosquitto: EmbeddedMosquitto,
    module_db: str,
    record: Callable[..., None],
) -> None:
    flood = [(f"meters/F-{n % 100}/telemetry", b"not json %d" % n) for n in range(20_000)]
    publisher = RawPublisher("127.0.0.1", mosquitto.port, client_id="flood")
    publisher.publish_many(flood)
    publisher.close()

    def dropped() -> float:
        for line in hostile_daemon.get("/metrics").text.splitlines():
            if line.startswith("energy_ingest_rejections_dropped_total "):
                return float(line.split()[-1])
        return 0.0

    await eventually(lambda: asyncio.to_thread(lambda: dropped() >= 20_000 - KEEP_REJECTIONS))
    conn = await asyncpg.connect(module_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM rejections") <= KEEP_REJECTIONS
        newest = await conn.fetchval("SELECT payload FROM rejections ORDER BY id DESC LIMIT 1")
    finally:
        await conn.close()
    assert newest == "not json 19999"  # oldest out first
    listed = hostile_daemon.get("/v1/rejections", limit=1000).json()["rejections"]
    assert len(listed) <= KEEP_REJECTIONS
    record(flood=len(flood), kept=len(listed), dropped=dropped(), bound=KEEP_REJECTIONS)
