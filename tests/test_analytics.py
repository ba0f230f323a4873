"""Charging sessions and per-vehicle efficiency (SPEC §5, §6), checked by hand-computed totals."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from daemon.services import EmbeddedMosquitto, EmbeddedPostgres
from db.analytics import FIRST_KEY, _args, fleet_sql, vehicle_sql
from db.rollup import rebuild
from db.windows import HOUR, Piece, pieces
from tests.conftest import fresh_database
from tests.helpers import iso
from tests.services import DaemonProcess, Publisher


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def call(daemon: DaemonProcess, method: str, path: str, body: Any = None) -> httpx.Response:
    content = orjson.dumps(body) if body is not None else None
    return httpx.request(method, daemon.base_url + path, content=content, timeout=15)


def meter_reading(daemon: DaemonProcess, meter: str, at: datetime, kwh: float) -> None:
    body = {"meterId": meter, "kwhConsumedAc": kwh, "voltage": 230, "timestamp": iso(at)}
    assert call(daemon, "POST", "/v1/ingestion/meter", body).status_code == 201


def vehicle_reading(
    daemon: DaemonProcess, vehicle: str, at: datetime, kwh: float, temp: float
) -> None:
    body = {
        "vehicleId": vehicle,
        "soc": 50,
        "kwhDeliveredDc": kwh,
        "batteryTemp": temp,
        "timestamp": iso(at),
    }
    assert call(daemon, "POST", "/v1/ingestion/vehicle", body).status_code == 201


def link(daemon: DaemonProcess, vehicle: str, meter: str, route: str = "mapping") -> datetime:
    method, path = ("PUT", "/v1/links") if route == "links" else ("POST", "/v1/ingestion/mapping")
    response = call(daemon, method, path, {"vehicleId": vehicle, "meterId": meter})
    assert response.status_code in (200, 201), response.text
    return datetime.fromisoformat(response.json()["session"]["startedAt"])


def ms(n: int) -> timedelta:
    return timedelta(milliseconds=n)


def test_efficiency_counts_only_energy_measured_while_linked(
    daemon: DaemonProcess, mosquitto: EmbeddedMosquitto
) -> None:
    vehicle, meter_a, meter_b = new_id("V"), new_id("MA"), new_id("MB")
    before = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    meter_reading(daemon, meter_a, before, 5.0)  # before any link: not counted

    linked_a = link(daemon, vehicle, meter_a)
    meter_reading(daemon, meter_a, linked_a + ms(1), 2.0)
    meter_reading(daemon, meter_a, linked_a + ms(2), 3.0)
    vehicle_reading(daemon, vehicle, linked_a + ms(1), 1.6, 30.0)
    vehicle_reading(daemon, vehicle, linked_a + ms(2), 2.4, 34.0)
    # The same DC reading again over HTTP and over MQTT: counted once.
    vehicle_reading(daemon, vehicle, linked_a + ms(2), 2.4, 34.0)
    publisher = Publisher(mosquitto.port)
    payload = {
        "vehicleId": vehicle,
        "soc": 50,
        "kwhDeliveredDc": 2.4,
        "batteryTemp": 34.0,
        "timestamp": iso(linked_a + ms(2)),
    }
    publisher.publish_all([(f"vehicles/{vehicle}/telemetry", orjson.dumps(payload))])
    publisher.close()

    while datetime.now(UTC) < linked_a + ms(50):
        pass
    linked_b = link(daemon, vehicle, meter_b, route="links")
    assert linked_b > linked_a + ms(2)
    meter_reading(daemon, meter_a, linked_b + ms(1), 7.0)  # A after the relink: not counted
    meter_reading(daemon, meter_b, linked_b + ms(1), 4.0)
    meter_reading(daemon, meter_b, linked_b + ms(2), 1.0)
    vehicle_reading(daemon, vehicle, linked_b + ms(2), 3.0, 32.0)

    window = {
        "startTime": iso(before - timedelta(minutes=5)),
        "endTime": iso(datetime.now(UTC) + timedelta(minutes=1)),
    }
    response = httpx.get(
        f"{daemon.base_url}/v1/analytics/performance/{vehicle}", params=window, timeout=15
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["totalAcConsumedKwh"] == pytest.approx(2.0 + 3.0 + 4.0 + 1.0)
    assert body["totalDcDeliveredKwh"] == pytest.approx(1.6 + 2.4 + 3.0)
    assert body["efficiencyRatio"] == pytest.approx(7.0 / 10.0, abs=1e-4)
    assert body["alert"] is True and body["alertThreshold"] == 0.85
    assert body["avgBatteryTemp"] == pytest.approx((30 + 34 + 32) / 3, abs=1e-3)
    assert body["readings"] == {"meter": 4, "vehicle": 3}
    assert [(m["meterId"], m["acConsumedKwh"]) for m in body["meters"]] == sorted(
        [(meter_a, 5.0), (meter_b, 5.0)]
    )

    # A window that ends between the two links sees meter A only.
    early = httpx.get(
        f"{daemon.base_url}/v1/analytics/performance/{vehicle}",
        params={"startTime": iso(linked_a), "endTime": iso(linked_a + ms(3))},
        timeout=15,
    ).json()
    assert early["totalAcConsumedKwh"] == pytest.approx(5.0)
    assert early["totalDcDeliveredKwh"] == pytest.approx(4.0)
    assert early["alert"] is True


def test_relinking_to_the_same_meter_changes_nothing(daemon: DaemonProcess) -> None:
    vehicle, meter = new_id("V"), new_id("M")
    first = call(daemon, "PUT", "/v1/links", {"vehicleId": vehicle, "meterId": meter})
    again = call(daemon, "POST", "/v1/ingestion/mapping", {"vehicleId": vehicle, "meterId": meter})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["changed"] is False
    assert again.json()["session"] == first.json()["session"]


def test_relink_ends_the_previous_session_at_the_same_instant(daemon: DaemonProcess) -> None:
    vehicle = new_id("V")
    link(daemon, vehicle, new_id("M"))
    second = call(daemon, "PUT", "/v1/links", {"vehicleId": vehicle, "meterId": new_id("M")})
    body = second.json()
    assert body["previous"]["endedAt"] == body["session"]["startedAt"]


def test_no_ac_energy_gives_a_null_ratio_and_no_alert(daemon: DaemonProcess) -> None:
    vehicle = new_id("V")
    vehicle_reading(daemon, vehicle, datetime.now(UTC) - timedelta(minutes=1), 1.0, 20.0)
    body = httpx.get(f"{daemon.base_url}/v1/analytics/performance/{vehicle}", timeout=15).json()
    assert body["efficiencyRatio"] is None and body["alert"] is False
    assert body["totalDcDeliveredKwh"] == 1.0 and body["meters"] == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"startTime": "2026-01-02T00:00:00Z", "endTime": "2026-01-01T00:00:00Z"}, "startTime"),
        ({"startTime": "2026-01-01T00:00:00Z", "endTime": "2026-01-01T00:00:00Z"}, "startTime"),
        ({"startTime": "2025-01-01T00:00:00Z", "endTime": "2026-01-01T00:00:00Z"}, "endTime"),
        ({"startTime": "yesterday"}, "startTime"),
        ({"endTime": "2026-01-01T00:00:00"}, "endTime"),
        ({"startTime": "2026-01-01T00:00:00Z\x00garbage"}, "startTime"),  # (read to the NUL)
    ],
)
def test_bad_windows_are_400_naming_the_parameter(
    daemon: DaemonProcess, params: dict[str, str], field: str
) -> None:
    vehicle = new_id("V")
    link(daemon, vehicle, new_id("M"))
    response = httpx.get(
        f"{daemon.base_url}/v1/analytics/performance/{vehicle}", params=params, timeout=15
    )
    assert response.status_code == 400
    assert response.json()["detail"][0]["field"] == field


def test_unknown_vehicle_is_404(daemon: DaemonProcess) -> None:
    response = httpx.get(f"{daemon.base_url}/v1/analytics/performance/nobody-at-all", timeout=15)
    assert response.status_code == 404


def test_offsets_in_query_parameters_survive_a_missing_url_encoding(
    daemon: DaemonProcess,
) -> None:
    vehicle = new_id("V")
    link(daemon, vehicle, new_id("M"))
    url = (
        f"{daemon.base_url}/v1/analytics/performance/{vehicle}"
        "?startTime=2026-11-24T10:00:00+01:00&endTime=2026-11-24T12:00:00+01:00"
    )
    body = httpx.get(url, timeout=15).json()
    assert body["window"]["startTime"] == "2026-11-24T10:00:00+01:00"


# --- the plan: cost depends on the window, not on the history ---------------------------

HISTORY_DAYS = 6
DEVICES = 200
STEP_MIN = 5


def bulk(stream: str, since: str, until: str) -> str:
    """History for DEVICES devices every STEP_MIN minutes in [since, until), straight in SQL."""
    values = "'M' || d, t, 0.1, 230" if stream == "meter" else "'V' || d, t, 50, 0.09, 25"
    columns = (
        "meter_id, ts, kwh_consumed_ac, voltage"
        if stream == "meter"
        else "vehicle_id, ts, soc, kwh_delivered_dc, battery_temp"
    )
    return f"""
INSERT INTO {stream}_readings ({columns}, received_at)
SELECT {values}, t
FROM generate_series(1, {DEVICES}) d,
     generate_series({since}, {until} - interval '1 microsecond',
                     interval '{STEP_MIN} minutes') t"""


TODAY = "date_trunc('day', now())"
FULL_HISTORY = (f"{TODAY} - interval '{HISTORY_DAYS} days'", TODAY)


def scanned(plan: dict[str, Any]) -> list[tuple[str, str]]:
    found = []
    if "Relation Name" in plan:
        found.append((plan["Node Type"], plan["Relation Name"]))
    for child in plan.get("Plans", []):
        found.extend(scanned(child))
    return found


def statement(
    split: list[Piece], window: tuple[datetime, datetime], one_vehicle: bool
) -> tuple[str, list[Any]]:
    """One vehicle's statement (V7), or the fleet's first page, with their parameters."""
    if one_vehicle:
        return vehicle_sql(split), [*_args(split, *window), "V7", 900.0]
    return fleet_sql(split), [*_args(split, *window), False, 0.0, *FIRST_KEY, 101, 900.0]


async def test_analytics_plan_reads_only_the_window_partitions_from_the_index(
    postgres: EmbeddedPostgres,
) -> None:
    conn = await asyncpg.connect(await fresh_database(postgres))
    try:
        await conn.execute(bulk("meter", *FULL_HISTORY))
        await conn.execute(bulk("vehicle", *FULL_HISTORY))
        await conn.execute(
            "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at, ended_at) VALUES "
            "('V7', 'M7', now() - interval '10 days', now() - interval '3 days'), "
            "('V7', 'M8', now() - interval '3 days', NULL)"
        )
        await conn.execute("VACUUM ANALYZE")  # as autovacuum leaves the older partitions
        day = (datetime.now(UTC) - timedelta(days=2)).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        window = (day + timedelta(hours=6, minutes=10), day + timedelta(hours=18, minutes=50))
        await rebuild(conn, datetime.now(UTC) - timedelta(days=40), datetime.now(UTC))
        await conn.execute("VACUUM ANALYZE")
        partition = f"_p{day:%Y%m%d}"
        split = pieces(*window, now=datetime.now(UTC))
        for one_vehicle in (True, False):
            sql, args = statement(split, window, one_vehicle)
            raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
            nodes = scanned(json.loads(raw)[0]["Plan"])
            stored = [
                (kind, rel) for kind, rel in nodes if "_readings_p" in rel or "_hourly_p" in rel
            ]
            assert stored, nodes
            assert all(rel.endswith(partition) for _, rel in stored), stored
            if one_vehicle:  # a vehicle's raw readings from the key's index alone
                readings = [kind for kind, rel in stored if "_readings_" in rel]
                assert readings and all(kind == "Index Only Scan" for kind in readings), stored
        total = await conn.fetchval("SELECT count(*) FROM meter_readings")
        assert total > 300_000  # a history much larger than the window
    finally:
        await conn.close()


async def test_analytics_answer_does_not_grow_with_history(postgres: EmbeddedPostgres) -> None:
    """Buffers touched by the query over one window, before and after adding more days."""
    conn = await asyncpg.connect(await fresh_database(postgres))
    try:
        window_end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        window = (window_end - timedelta(hours=6), window_end)

        split = pieces(*window, now=datetime.now(UTC))

        async def buffers(one_vehicle: bool) -> int:
            sql, args = statement(split, window, one_vehicle)
            raw = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args)
            plan = json.loads(raw)[0]["Plan"]
            return int(plan["Shared Hit Blocks"] + plan["Shared Read Blocks"])

        for stream in ("meter", "vehicle"):
            await conn.execute(bulk(stream, f"{TODAY} - interval '1 day'", "now()"))
        await conn.execute(
            "INSERT INTO charging_sessions (vehicle_id, meter_id, started_at) "
            "SELECT 'V' || d, 'M' || d, now() - interval '40 days' "
            f"FROM generate_series(1, {DEVICES}) d"
        )
        await rebuild(conn, datetime.now(UTC) - timedelta(days=2), datetime.now(UTC))
        await conn.execute("VACUUM ANALYZE")
        small = {flag: await buffers(flag) for flag in (True, False)}
        for stream in ("meter", "vehicle"):
            await conn.execute(bulk(stream, FULL_HISTORY[0], f"{TODAY} - interval '1 day'"))
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        await rebuild(conn, today - timedelta(days=HISTORY_DAYS), today - timedelta(days=1))
        await conn.execute("VACUUM ANALYZE")
        for flag in (True, False):  # one vehicle, and the whole fleet
            large = await buffers(flag)
            assert large <= small[flag] * 1.5 + 10, (flag, small[flag], large)
    finally:
        await conn.close()


async def test_absurd_stored_energy_does_not_break_analytics(daemon: DaemonProcess) -> None:
    """Rows of 1.7e308 kWh, stored before MAX_KWH_PER_READING existed (written here past the
    validation): a float sum would overflow (22003); analytics still answers."""
    vehicle, meter = new_id("V"), new_id("M")
    link(daemon, vehicle, meter)
    conn = await asyncpg.connect(daemon.env["DATABASE_URL"])
    try:
        for seconds in (1, 2):
            at = datetime.now(UTC) + timedelta(seconds=seconds)  # while linked
            await conn.execute(
                "INSERT INTO meter_readings VALUES ($1, $2, 1.7e308, 230, now())", meter, at
            )
            await conn.execute(
                "INSERT INTO vehicle_readings VALUES ($1, $2, 50, 1.7e308, 20, now())", vehicle, at
            )
        await rebuild(
            conn, datetime.now(UTC), datetime.now(UTC) + HOUR, meters=[meter], vehicles=[vehicle]
        )
    finally:
        await conn.close()
    window = {"endTime": iso(datetime.now(UTC) + timedelta(hours=1))}
    response = httpx.get(
        f"{daemon.base_url}/v1/analytics/performance/{vehicle}", params=window, timeout=15
    )
    assert response.status_code == 200, response.text
    assert response.json()["readings"] == {"meter": 2, "vehicle": 2}
