"""Ingestion over HTTP with the exact bodies firmware in the field sends (SPEC §4)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from daemon.services import EmbeddedMosquitto
from tests.helpers import eventually, iso, meter_json, minutes_ago, vehicle_json
from tests.services import DaemonProcess, Publisher, database_url, running_postgres


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def post(daemon: DaemonProcess, path: str, body: Any, method: str = "POST") -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.request(method, daemon.base_url + path, content=content, timeout=15)


def meter_body(meter: str, minutes: float = 1, **changes: Any) -> dict[str, Any]:
    return {**orjson.loads(meter_json(meter, minutes_ago(minutes))), **changes}


def vehicle_body(vehicle: str, minutes: float = 1, **changes: Any) -> dict[str, Any]:
    return {**orjson.loads(vehicle_json(vehicle, minutes_ago(minutes))), **changes}


@pytest.fixture
async def db(module_db: str) -> Any:
    conn = await asyncpg.connect(module_db)
    yield conn
    await conn.close()


async def stored(db: asyncpg.Connection, table: str, column: str, device: str) -> int:
    value: int = await db.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", device)
    return value


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v1/ingestion/meter", "meter"),
        ("/v1/telemetry/meter", "meter"),
        ("/v1/ingestion", "meter"),
        ("/v1/ingest", "meter"),
        ("/v1/ingestion/vehicle", "vehicle"),
        ("/v1/telemetry/vehicle", "vehicle"),
        ("/v1/ingestion", "vehicle"),
        ("/v1/ingest", "vehicle"),
    ],
)
async def test_single_reading_routes_store_and_answer_201_after_commit(
    daemon: DaemonProcess, db: asyncpg.Connection, path: str, kind: str
) -> None:
    device = new_id(kind[0].upper())
    body = meter_body(device) if kind == "meter" else vehicle_body(device)
    response = post(daemon, path, body)
    assert response.status_code == 201, response.text
    answer = response.json()
    assert answer["status"] == "accepted" and answer["deviceId"] == device
    # 201 means committed: the row is there the moment the answer arrives.
    assert await stored(db, f"{kind}_readings", f"{kind}_id", device) == 1
    again = post(daemon, path, body)
    assert again.status_code == 201 and again.json()["status"] == "duplicate"
    assert await stored(db, f"{kind}_readings", f"{kind}_id", device) == 1


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/v1/ingestion/meter/batch", "meter"), ("/v1/ingestion/vehicle/batch", "vehicle")],
)
async def test_batch_counts_accepted_duplicates_and_rejected_with_reasons(
    daemon: DaemonProcess, db: asyncpg.Connection, path: str, kind: str
) -> None:
    device = new_id(kind[0].upper())
    make = meter_body if kind == "meter" else vehicle_body
    first = make(device, 3)
    post(daemon, path, {"readings": [first]})
    bad_field = "voltage" if kind == "meter" else "soc"
    readings = [first, make(device, 2), make(device, 1, **{bad_field: 5000}), make(device, 0.5)]
    response = post(daemon, path, {"readings": readings})
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 1, 1)
    assert body["rejections"][0]["index"] == 2
    assert body["rejections"][0]["problems"][0]["field"] == bad_field
    assert await stored(db, f"{kind}_readings", f"{kind}_id", device) == 3


async def test_rejected_http_readings_are_listed_with_mqtt_ones(daemon: DaemonProcess) -> None:
    meter = new_id("M")
    response = post(daemon, "/v1/ingestion/meter", meter_body(meter, voltage=-1))
    assert response.status_code == 422
    assert response.json()["detail"] == [
        {"field": "voltage", "message": "Input should be greater than or equal to 0"}
    ]

    async def listed() -> list[dict[str, Any]]:
        page = (await asyncio.to_thread(daemon.get, "/v1/rejections", source="http")).json()
        return [r for r in page["rejections"] if meter in r["payload"]]

    rows = await eventually(listed)
    assert rows[0]["topicOrRoute"] == "POST /v1/ingestion/meter"
    assert "voltage" in rows[0]["reason"]


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/v1/ingestion/meter", b'{"meterId": ', 400, ""),
        ("/v1/ingestion/meter", b"", 400, ""),
        ("/v1/ingestion/meter", b"[1, 2]", 422, ""),
        ("/v1/ingestion/meter", b'{"meterId": "M", "kwhConsumedAc": "1"}', 422, "kwhConsumedAc"),
        ("/v1/ingestion", b'{"kwhConsumedAc": 1}', 422, ""),
        ("/v1/ingest", b'{"meterId": "M", "vehicleId": "V"}', 422, ""),
        ("/v1/ingestion/meter/batch", b'{"reading": []}', 422, "readings"),
        ("/v1/ingestion/vehicle/batch", b"[]", 422, "readings"),
        ("/v1/ingestion/mapping", b'{"vehicleId": "V"}', 422, "meterId"),
        ("/v1/links", b'{"vehicleId": "V", "meterId": "has space"}', 422, "meterId"),
    ],
)
def test_bad_bodies_get_4xx_naming_the_problem(
    daemon: DaemonProcess, path: str, body: bytes, status: int, field: str
) -> None:
    method = "PUT" if path == "/v1/links" else "POST"
    response = post(daemon, path, body, method=method)
    assert response.status_code == status, response.text
    assert field in {p["field"] for p in response.json()["detail"]}


def test_oversized_body_is_413_before_it_is_read_whole(daemon: DaemonProcess) -> None:
    response = post(daemon, "/v1/ingestion/meter/batch", b" " * (4 * 1024 * 1024 + 1))
    assert response.status_code == 413

    def chunks() -> Any:
        for _ in range(5000):
            yield b" " * 1024  # 5 MB, streamed without a Content-Length

    streamed = httpx.post(daemon.base_url + "/v1/ingestion/meter", content=chunks(), timeout=15)
    assert streamed.status_code == 413


def test_batch_over_the_count_limit_is_413(daemon: DaemonProcess) -> None:
    meter = new_id("M")
    readings = [meter_body(meter, m / 100) for m in range(10_001)]
    response = post(daemon, "/v1/ingestion/meter/batch", {"readings": readings})
    assert response.status_code == 413
    assert response.json()["detail"][0]["field"] == "readings"


async def test_the_same_reading_over_mqtt_and_http_counts_once(
    daemon: DaemonProcess, mosquitto: EmbeddedMosquitto, db: asyncpg.Connection
) -> None:
    vehicle = new_id("V")
    at = minutes_ago(1)
    publisher = Publisher(mosquitto.port)
    publisher.publish_all([(f"vehicles/{vehicle}/telemetry", vehicle_json(vehicle, at))])
    publisher.close()
    await eventually(lambda: stored(db, "vehicle_readings", "vehicle_id", vehicle))
    response = post(daemon, "/v1/ingestion/vehicle", orjson.loads(vehicle_json(vehicle, at)))
    assert response.status_code == 201 and response.json()["status"] == "duplicate"
    assert await stored(db, "vehicle_readings", "vehicle_id", vehicle) == 1


def test_metrics_count_readings_by_outcome_stream_and_transport(daemon: DaemonProcess) -> None:
    meter = new_id("M")
    body = meter_body(meter)
    post(daemon, "/v1/ingestion/meter", body)
    post(daemon, "/v1/ingestion/meter", body)
    post(daemon, "/v1/ingestion/meter", {**body, "voltage": 2000})
    text = daemon.get("/metrics").text
    for outcome in ("accepted", "duplicate", "rejected"):
        line = (
            f'energy_ingest_readings_total{{outcome="{outcome}",stream="meter",transport="http"}}'
        )
        assert line in text, outcome
    for name in (
        "energy_ingest_buffer_depth",
        "energy_ingest_flush_readings_bucket",
        "energy_ingest_flush_seconds_bucket",
        'energy_ingest_lag_seconds_bucket{le="0.01",since="receive"}',
        'since="reading"',
        "energy_ingest_database_up 1.0",
        "energy_ingest_broker_connected 1.0",
    ):
        assert name in text, name


async def test_database_down_is_503_with_retry_after_never_a_hang(
    mosquitto: EmbeddedMosquitto,
) -> None:
    with running_postgres() as pg:
        daemon = DaemonProcess(
            database_url=database_url(pg, "energy"), mqtt_url=mosquitto.url, http_commit_timeout_s=2
        ).start()
        try:
            await asyncio.to_thread(pg.stop)
            during = [meter_body(new_id("M")) for _ in range(3)]
            answers, waited = [], []
            for body in during:
                started = time.monotonic()
                answers.append(post(daemon, "/v1/ingestion/meter", body))
                waited.append(time.monotonic() - started)
            for response in answers:
                assert response.status_code == 503, response.text
                assert int(response.headers["retry-after"]) > 0
            status = daemon.get("/v1/status/meter/anything")
            assert status.status_code == 503 and "retry-after" in status.headers
            assert daemon.get("/health").status_code == 503
            await asyncio.to_thread(pg.start)
            meter = new_id("M")

            def stored_again() -> bool:
                return post(daemon, "/v1/ingestion/meter", meter_body(meter)).status_code == 201

            await eventually(lambda: asyncio.to_thread(stored_again), timeout_s=30)
            # A request that waited out HTTP_COMMIT_TIMEOUT_S was buffered: answered 503, it is
            # still written once PostgreSQL is back. One refused at once (the database known
            # down) was not taken: its caller must retry.
            conn = await asyncpg.connect(database_url(pg, "energy"))
            try:
                for body, seconds in zip(during, waited, strict=True):
                    n = await conn.fetchval(
                        "SELECT count(*) FROM meter_readings WHERE meter_id = $1", body["meterId"]
                    )
                    assert n == (1 if seconds >= 1.5 else 0), (seconds, n)
            finally:
                await conn.close()
            assert max(waited) >= 1.5  # the first waited: the outage was not known yet
        finally:
            assert daemon.stop() == 0, daemon.log()


def test_readings_at_the_timestamp_limits(daemon: DaemonProcess) -> None:
    meter = new_id("M")
    ahead = post(daemon, "/v1/ingestion/meter", meter_body(meter, timestamp=iso(minutes_ago(-6))))
    assert ahead.status_code == 422 and ahead.json()["detail"][0]["field"] == "timestamp"
    old = post(
        daemon, "/v1/ingestion/meter", meter_body(meter, timestamp=iso(minutes_ago(60 * 24 * 31)))
    )
    assert old.status_code == 422 and old.json()["detail"][0]["field"] == "timestamp"


async def test_a_conflict_is_recorded_never_merged_nor_called_a_duplicate(
    daemon: DaemonProcess, db: asyncpg.Connection
) -> None:
    """The first value stored for (device, moment) stands; the same again is a duplicate;
    other values are a conflict: not stored, recorded with both values, counted, answered
    409 (one reading) or listed (a batch, first in order within it); the latest state is the
    history's row. Below a microsecond, two readings are one moment."""
    meter = new_id("CF")
    first = meter_body(meter, kwhConsumedAc=1.25)
    assert post(daemon, "/v1/ingestion/meter", first).json()["status"] == "accepted"
    assert post(daemon, "/v1/ingestion/meter", first).json()["status"] == "duplicate"
    other = {**first, "kwhConsumedAc": 9.5}
    refused = post(daemon, "/v1/ingestion/meter", other)
    assert refused.status_code == 409, refused.text
    reason = refused.json()["detail"][0]["message"]
    assert "conflict" in reason and "1.25" in reason and "9.5" in reason
    later = meter_body(meter, minutes=0.5, kwhConsumedAc=2.0)
    batch = post(
        daemon,
        "/v1/ingestion/meter/batch",
        {"readings": [later, {**later, "kwhConsumedAc": 7.0}, later, other]},
    ).json()
    assert (batch["accepted"], batch["duplicates"], batch["conflicts"]) == (1, 1, 2), batch
    assert sorted(r["index"] for r in batch["rejections"]) == [1, 3]
    stored = await db.fetch(
        "SELECT ts, kwh_consumed_ac FROM meter_readings WHERE meter_id = $1 ORDER BY ts", meter
    )
    assert [r["kwh_consumed_ac"] for r in stored] == [1.25, 2.0]
    latest = await db.fetchval(
        "SELECT kwh_consumed_ac FROM meter_latest WHERE meter_id = $1", meter
    )
    assert latest == 2.0  # the history's row, not the conflicting 7.0 of the same moment
    recorded = await db.fetchval(
        "SELECT count(*) FROM rejections WHERE reason LIKE 'conflict:%' AND payload LIKE $1",
        f"%{meter}%",
    )
    assert recorded == 3
    metrics = daemon.get("/metrics").text
    assert 'energy_ingest_readings_total{outcome="conflict",stream="meter",transport="http"}' in (
        metrics
    )
    # Digits past the sixth are the same moment: other values there are a conflict too.
    at = minutes_ago(2).strftime("%Y-%m-%dT%H:%M:%S")
    near = {**first, "timestamp": f"{at}.1234561Z", "kwhConsumedAc": 1.0}
    assert post(daemon, "/v1/ingestion/meter", near).status_code == 201
    nearer = {**near, "timestamp": f"{at}.1234569Z", "kwhConsumedAc": 3.0}
    assert post(daemon, "/v1/ingestion/meter", nearer).status_code == 409


def test_a_leap_second_is_refused_in_words(daemon: DaemonProcess) -> None:
    body = meter_body(new_id("LS"), timestamp="2016-12-31T23:59:60Z")
    answer = post(daemon, "/v1/ingestion/meter", body)
    assert answer.status_code == 422
    message = answer.json()["detail"][0]["message"]
    assert "leap second" in message and "23:59:59.999999" in message


async def test_a_request_of_many_conflicts_records_twenty_and_answers_all(
    daemon: DaemonProcess, db: asyncpg.Connection
) -> None:
    """One record for each of the first 20 conflicts of a request, every conflict answered
    and counted: a request of 10,000 conflicting readings once pushed every other record out
    of the bounded rejections table."""
    meter = new_id("CM")
    readings = [meter_body(meter, minutes=n / 60) for n in range(60)]
    assert post(daemon, "/v1/ingestion/meter/batch", {"readings": readings}).status_code == 201
    others = [{**r, "kwhConsumedAc": 9.75} for r in readings]
    answer = post(daemon, "/v1/ingestion/meter/batch", {"readings": others}).json()
    assert answer["conflicts"] == 60 and len(answer["rejections"]) == 60, answer
    recorded = await db.fetch(
        "SELECT reason FROM rejections WHERE reason LIKE 'conflict:%' AND payload LIKE $1"
        " ORDER BY id",
        f"%{meter}%",
    )
    assert len(recorded) == 20
    assert "the first 20 conflicts of a message or request are recorded" in recorded[-1]["reason"]
