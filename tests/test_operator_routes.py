"""Operator routes served by the daemon: health, the overview, status, rejections, sessions
(SPEC §6)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from daemon.services import EmbeddedMosquitto, free_port
from tests.helpers import iso
from tests.services import DaemonProcess, database_url, running_postgres, wait_until


def meter(meter_id: str, at: datetime) -> dict[str, Any]:
    return {"meterId": meter_id, "kwhConsumedAc": 0.5, "voltage": 230.0, "timestamp": iso(at)}


def vehicle(vehicle_id: str, at: datetime) -> dict[str, Any]:
    return {
        "vehicleId": vehicle_id,
        "soc": 50.0,
        "kwhDeliveredDc": 0.4,
        "batteryTemp": 25.0,
        "timestamp": iso(at),
    }


def test_health_reports_database_broker_and_buffer(daemon: DaemonProcess) -> None:
    body = daemon.get("/health").json()
    assert body["status"] == "ok"
    assert body["database"]["ok"] and body["broker"]["ok"]
    assert body["buffer"] == {"depth": 0, "max": 50000}


@pytest.mark.parametrize("path", ["/v1/status/meter/nobody", "/v1/status/vehicle/nobody"])
def test_unknown_device_is_404_with_a_json_reason(daemon: DaemonProcess, path: str) -> None:
    response = daemon.get(path)
    assert response.status_code == 404
    assert "nobody" in response.json()["detail"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"source": "fax"}, "source"),
        ({"before": "1.5"}, "before"),
    ],
)
def test_bad_rejection_queries_name_the_parameter(
    daemon: DaemonProcess, params: dict[str, str], field: str
) -> None:
    response = daemon.get("/v1/rejections", **params)
    assert response.status_code == 400
    assert response.json()["detail"][0]["field"] == field


def test_unknown_route_is_a_json_404(daemon: DaemonProcess) -> None:
    response = daemon.get("/v1/nothing-here")
    assert response.status_code == 404 and "detail" in response.json()


def test_health_is_503_while_the_broker_is_unreachable(module_db: str) -> None:
    daemon = DaemonProcess(database_url=module_db, mqtt_url=f"mqtt://127.0.0.1:{free_port()}")
    daemon.start(wait=False)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = daemon.get("/health")
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, daemon.log()
                time.sleep(0.1)
        assert response.status_code == 503
        body = response.json()
        assert body["database"]["ok"] and not body["broker"]["ok"]
        assert body["broker"]["detail"]
    finally:
        assert daemon.stop() == 0, daemon.log()


def post(daemon: DaemonProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(daemon.base_url + path, json=body, timeout=10)


def test_overview_counts_devices_seen_readings_stored_and_rejections(
    daemon: DaemonProcess,
) -> None:
    tag = uuid.uuid4().hex[:6]
    now = datetime.now(UTC)
    for n in range(3):
        assert post(daemon, "/v1/ingestion/meter", meter(f"OM{n}-{tag}", now)).status_code == 201
    for n in range(2):
        reading = vehicle(f"OV{n}-{tag}", now)
        assert post(daemon, "/v1/ingestion/vehicle", reading).status_code == 201
    # An old reading is stored, but its device has not been seen lately...
    old = post(daemon, "/v1/ingestion/meter", meter(f"OLD-{tag}", now - timedelta(days=1)))
    assert old.status_code == 201
    # ... and a rejected one is counted as a rejection.
    bad = post(daemon, "/v1/ingestion/meter", {**meter(f"OM0-{tag}", now), "voltage": -1})
    assert bad.status_code == 422

    def stored_lately() -> dict[str, Any] | None:
        body: dict[str, Any] = daemon.get("/v1/overview").json()
        # (the rejection is recorded by a flush of its own: it may come a moment later)
        recorded = (body["rejections"]["count"] or 0) >= 1
        return body if body["storedPerSecond"]["value"] >= 0.6 and recorded else None

    body = wait_until(stored_lately, timeout_s=5)
    assert body["status"] == "ok" and body["database"]["ok"] and body["broker"]["ok"]
    assert body["devicesSeen"] == {"windowSeconds": 300, "meters": 4, "vehicles": 2}
    assert body["rejections"] == {"windowSeconds": 3600, "count": 1, "atLeast": False}
    # 6 readings stored within the last 10 s (once their seconds are over), no more
    assert body["storedPerSecond"]["value"] == pytest.approx(0.6)
    assert body["buffer"]["depth"] == 0 and body["alertThreshold"] == 0.85


def test_overview_while_the_database_is_down_still_answers_with_the_reason(
    mosquitto: EmbeddedMosquitto,
) -> None:
    with running_postgres() as pg:
        daemon = DaemonProcess(database_url=database_url(pg, "energy"), mqtt_url=mosquitto.url)
        daemon.start()
        try:
            pg.stop()
            # (/health and the overview tell what the probe found, asking every second.)
            response = wait_until(
                lambda: (r := daemon.get("/v1/overview")).json()["database"]["ok"] is False and r
            )
            assert response.status_code == 200
            body = response.json()
            assert not body["database"]["ok"] and body["database"]["state"] == "down"
            assert body["database"]["detail"] and body["countsDetail"]
            assert body["devicesSeen"]["meters"] is None and body["rejections"]["count"] is None
            assert body["broker"]["ok"]
        finally:
            pg.start()
            assert daemon.stop() == 0, daemon.log()


def test_links_list_a_vehicles_sessions_newest_first_page_by_page(daemon: DaemonProcess) -> None:
    tag = uuid.uuid4().hex[:6]
    car, meters = f"LV-{tag}", [f"LM{n}-{tag}" for n in range(3)]
    for meter_id in meters:
        response = httpx.put(
            daemon.base_url + "/v1/links", json={"vehicleId": car, "meterId": meter_id}, timeout=10
        )
        assert response.status_code == 201
    listed = daemon.get("/v1/links", vehicleId=car).json()
    sessions = listed["links"]
    assert [s["meterId"] for s in sessions] == meters[::-1] and listed["next"] is None
    assert sessions[0]["endedAt"] is None
    assert sessions[1]["endedAt"] == sessions[0]["startedAt"]
    assert sessions[2]["endedAt"] == sessions[1]["startedAt"]

    first = daemon.get("/v1/links", vehicleId=car, limit=2).json()
    assert [s["meterId"] for s in first["links"]] == meters[:0:-1]
    rest = daemon.get("/v1/links", vehicleId=car, limit=2, startedBefore=first["next"]).json()
    assert [s["meterId"] for s in rest["links"]] == meters[:1] and rest["next"] is None

    by_meter = daemon.get("/v1/links", meterId=meters[1]).json()["links"]
    assert [(s["vehicleId"], s["meterId"]) for s in by_meter] == [(car, meters[1])]
    assert daemon.get("/v1/links", vehicleId="<never stored>").json() == {
        "links": [],
        "next": None,
    }


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "vehicleId"),
        ({"vehicleId": "a", "meterId": "b"}, "vehicleId"),
        ({"vehicleId": "a", "limit": "0"}, "limit"),
        ({"vehicleId": "a", "limit": "1001"}, "limit"),
        ({"vehicleId": "a", "limit": "9" * 5000}, "limit"),
        ({"vehicleId": "a", "limit": "²"}, "limit"),
        ({"vehicleId": "a", "startedBefore": "yesterday"}, "startedBefore"),
        ({"vehicleId": "a", "startedBefore": "2026-01-01T00:00:00"}, "startedBefore"),
    ],
)
def test_bad_link_queries_name_the_parameter(
    daemon: DaemonProcess, params: dict[str, str], field: str
) -> None:
    response = daemon.get("/v1/links", **params)
    assert response.status_code == 400, response.text
    assert response.json()["detail"][0]["field"] == field
