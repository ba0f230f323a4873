"""Operator routes served by the daemon: health, status, rejections (SPEC §6)."""

from __future__ import annotations

import time

import httpx
import pytest

from daemon.embedded import free_port
from tests.services import DaemonProcess


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
