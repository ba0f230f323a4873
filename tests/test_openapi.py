"""The OpenAPI document, the offline docs, and a property-based run against every route."""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.core.result import Ok

from api.routes import ENDPOINTS
from tests.services import DaemonProcess

SPEC_ROUTES = {
    ("post", "/v1/ingestion/meter"),
    ("post", "/v1/ingestion/vehicle"),
    ("post", "/v1/ingestion/meter/batch"),
    ("post", "/v1/ingestion/vehicle/batch"),
    ("post", "/v1/ingestion"),
    ("post", "/v1/ingest"),
    ("post", "/v1/telemetry/meter"),
    ("post", "/v1/telemetry/vehicle"),
    ("post", "/v1/ingestion/mapping"),
    ("put", "/v1/links"),
    ("delete", "/v1/links/{vehicleId}"),
    ("get", "/v1/analytics/performance/{vehicleId}"),
    ("get", "/v1/analytics/performance/{vehicleId}/series"),
    ("get", "/v1/analytics/fleet"),
    ("get", "/v1/links"),
    ("get", "/v1/devices"),
    ("get", "/v1/overview"),
    ("get", "/v1/status/vehicle/{vehicleId}"),
    ("get", "/v1/status/meter/{meterId}"),
    ("get", "/v1/rejections"),
    ("get", "/health"),
    ("get", "/metrics"),
}


def test_every_route_of_the_contract_is_documented_with_its_schemas(
    daemon: DaemonProcess,
) -> None:
    document = daemon.get("/openapi.json").json()
    documented = {(m, path) for path, ops in document["paths"].items() for m in ops}
    assert documented == SPEC_ROUTES
    schemas = document["components"]["schemas"]
    meter = schemas["MeterReading"]
    assert set(meter["required"]) == {"meterId", "kwhConsumedAc", "voltage", "timestamp"}
    assert meter["properties"]["voltage"]["maximum"] == 1000
    single = document["paths"]["/v1/ingest"]["post"]
    assert len(single["requestBody"]["content"]["application/json"]["schema"]["oneOf"]) == 2
    assert "201" in single["responses"] and "503" in single["responses"]


def test_the_route_table_is_what_the_app_serves(daemon: DaemonProcess) -> None:
    """Every route of the table is served: a 404 may say a device is unknown, never that
    there is no such route (Starlette's own "Not Found"), and no route answers 405."""
    for endpoint in ENDPOINTS:
        path = endpoint.path.replace("{vehicleId}", "x").replace("{meterId}", "x")
        response = httpx.request(endpoint.method, daemon.base_url + path, timeout=10)
        assert response.status_code != 405, endpoint.path
        if response.status_code == 404:
            assert response.json()["detail"] != NO_SUCH_ROUTE, endpoint.path
    unrouted = httpx.get(daemon.base_url + "/v1/no/such/route", timeout=10)
    assert unrouted.status_code == 404 and unrouted.json()["detail"] == NO_SUCH_ROUTE


def test_docs_are_served_without_internet(daemon: DaemonProcess) -> None:
    page = daemon.get("/docs").text
    assert "http://" not in page and "https://" not in page
    for asset in (
        "/static/swagger-ui/swagger-ui-bundle.js",
        "/static/swagger-ui/swagger-ui.css",
        "/static/docs.js",
    ):
        assert asset in page
        assert daemon.get(asset).status_code == 200, asset


NO_SUCH_ROUTE = "Not Found"  # Starlette's answer when no route matches
EXAMPLES_PER_ROUTE = 40
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


def test_every_answer_to_generated_input_is_what_the_document_says(
    daemon: DaemonProcess,
) -> None:
    """Schemathesis generates bodies and parameters for every operation from /openapi.json,
    valid and invalid alike. No answer may be a 5xx (the database is up, so not even 503),
    and every answer must be one the document declares: its status, its content type, and a
    body of its schema (the handlers build their answers by hand: this holds them to it)."""
    api = schemathesis.openapi.from_url(daemon.base_url + "/openapi.json")
    failures: list[str] = []
    calls = 0
    for result in api.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_ROUTE,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case: Any) -> None:
            nonlocal calls
            calls += 1
            response = case.call(base_url=daemon.base_url, timeout=15)
            try:
                case.validate_response(response, checks=CHECKS)
            except Exception as failure:  # (schemathesis' FailureGroup: what did not hold)
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code} "
                    f"{response.text[:200]}: {str(failure)[:400]}"
                )

        run()
    assert calls >= len(SPEC_ROUTES) * 5
    assert not failures, failures[:10]
