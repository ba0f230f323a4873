"""API keys (SPEC §4): roles `ingest` and `operator`; open, and saying so, without keys."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from daemon.services import EmbeddedMosquitto
from tests.helpers import meter_json, minutes_ago
from tests.services import DaemonProcess

INGEST_KEY = "ingest-key-123"
OPERATOR_KEY = "operator-key-456"


@pytest.fixture(scope="module")
def secured(module_db: str, mosquitto: EmbeddedMosquitto) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        database_url=module_db,
        mqtt_url=mosquitto.url,
        ingest_api_keys=f"{INGEST_KEY}, spare-ingest-key",
        operator_api_keys=OPERATOR_KEY,
    ).start()
    yield process
    assert process.stop() == 0, process.log()


def request(
    daemon: DaemonProcess, method: str, path: str, key: str | None, body: bytes | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, daemon.base_url + path, headers=headers, content=body, timeout=10)


READING = meter_json("AUTH-1", minutes_ago(1))


@pytest.mark.parametrize(
    ("key", "status"), [(None, 401), ("wrong", 401), (OPERATOR_KEY, 403), (INGEST_KEY, 201)]
)
def test_ingestion_needs_an_ingest_key(
    secured: DaemonProcess, key: str | None, status: int
) -> None:
    response = request(secured, "POST", "/v1/ingestion/meter", key, READING)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "detail" in response.json()


@pytest.mark.parametrize(("key", "status"), [(None, 401), (INGEST_KEY, 403), (OPERATOR_KEY, 404)])
def test_operator_routes_need_an_operator_key(
    secured: DaemonProcess, key: str | None, status: int
) -> None:
    for path in (
        "/v1/status/meter/nobody",
        "/v1/analytics/performance/nobody",
        "/v1/analytics/performance/nobody/series",
    ):
        assert request(secured, "GET", path, key).status_code == status
    for path in ("/v1/rejections", "/v1/overview", "/v1/analytics/fleet", "/v1/links?vehicleId=x"):
        response = request(secured, "GET", path, key)
        assert response.status_code == (200 if status == 404 else status), path


def test_health_metrics_and_docs_stay_open(secured: DaemonProcess) -> None:
    for path in ("/health", "/metrics", "/openapi.json", "/docs", "/", "/static/uplot/LICENSE"):
        assert request(secured, "GET", path, None).status_code == 200, path
    assert secured.get("/health").json()["auth"] == "api keys required"
    document = secured.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_without_keys_the_api_is_open_and_says_so(daemon: DaemonProcess) -> None:
    assert daemon.get("/health").json()["auth"].startswith("open")
    assert "HTTP API is OPEN" in daemon.log()
