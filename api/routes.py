"""The route table: every route declared once, with its handler, its body and its answers.
The app's routing (`api.app`) and /openapi.json (`api.openapi`) both come from it, so they
cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from api import analytics, devices, fleet, ingestion, links, operators, series
from api.auth import Handler
from api.schemas import (
    BatchResult,
    FleetPage,
    Health,
    LinkPage,
    LinkRequest,
    LinkResult,
    MeterBatch,
    MeterStatus,
    Overview,
    Performance,
    RejectionPage,
    Series,
    SilentDevicePage,
    StoredReading,
    Unlinked,
    VehicleBatch,
    VehicleStatus,
)
from ingest.readings import MeterReading, VehicleReading


@dataclass(frozen=True, slots=True)
class Query:
    name: str
    description: str
    type: str = "string"
    format: str | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: tuple[type[BaseModel], ...] = ()
    ok: tuple[int, type[BaseModel] | None] = (200, None)
    errors: tuple[int, ...] = ()
    query: tuple[Query, ...] = field(default=())
    media_type: str = "application/json"
    also: tuple[int, ...] = ()  # more statuses answered with the ok body (a 503 of /health)
    csv: bool = False  # the ok answer may be text/csv too


WINDOW = (
    Query(
        "startTime",
        "window start, ISO 8601 with offset (default: endTime - 24 h)",
        format="date-time",
    ),
    Query("endTime", "window end, ISO 8601 with offset (default: now)", format="date-time"),
)
SINGLE_ERRORS = (400, 409, 413, 415, 422, 503)
BATCH_ERRORS = (400, 413, 415, 422, 503)
LINK_ERRORS = (400, 413, 415, 422, 503)
_both = (MeterReading, VehicleReading)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        "/v1/ingestion/meter",
        ingestion.meter_reading,
        "Store one meter reading",
        "ingestion",
        (MeterReading,),
        (201, StoredReading),
        SINGLE_ERRORS,
    ),
    Endpoint(
        "POST",
        "/v1/ingestion/vehicle",
        ingestion.vehicle_reading,
        "Store one vehicle reading",
        "ingestion",
        (VehicleReading,),
        (201, StoredReading),
        SINGLE_ERRORS,
    ),
    Endpoint(
        "POST",
        "/v1/ingestion/meter/batch",
        ingestion.meter_batch,
        "Store a batch of meter readings",
        "ingestion",
        (MeterBatch,),
        (201, BatchResult),
        BATCH_ERRORS,
    ),
    Endpoint(
        "POST",
        "/v1/ingestion/vehicle/batch",
        ingestion.vehicle_batch,
        "Store a batch of vehicle readings",
        "ingestion",
        (VehicleBatch,),
        (201, BatchResult),
        BATCH_ERRORS,
    ),
    Endpoint(
        "POST",
        "/v1/ingestion",
        ingestion.any_reading,
        "Store one reading of either kind (told apart by meterId / vehicleId)",
        "ingestion",
        _both,
        (201, StoredReading),
        SINGLE_ERRORS,
    ),
    Endpoint(
        "POST",
        "/v1/ingest",
        ingestion.any_reading,
        "Store one reading of either kind (alias of POST /v1/ingestion)",
        "ingestion",
        _both,
        (201, StoredReading),
        SINGLE_ERRORS,
    ),
    Endpoint(
        "POST",
        "/v1/telemetry/meter",
        ingestion.meter_reading,
        "Store one meter reading (alias)",
        "ingestion",
        (MeterReading,),
        (201, StoredReading),
        SINGLE_ERRORS,
    ),
    Endpoint(
        "POST",
        "/v1/telemetry/vehicle",
        ingestion.vehicle_reading,
        "Store one vehicle reading (alias)",
        "ingestion",
        (VehicleReading,),
        (201, StoredReading),
        SINGLE_ERRORS,
    ),
    Endpoint(
        "POST",
        "/v1/ingestion/mapping",
        links.link_vehicle,
        "Link a vehicle to the meter it charges on, from now (200 when unchanged)",
        "sessions",
        (LinkRequest,),
        (201, LinkResult),
        LINK_ERRORS,
        also=(200,),
    ),
    Endpoint(
        "PUT",
        "/v1/links",
        links.link_vehicle,
        "Link a vehicle to the meter it charges on (alias; 200 when unchanged)",
        "sessions",
        (LinkRequest,),
        (201, LinkResult),
        LINK_ERRORS,
        also=(200,),
    ),
    Endpoint(
        "DELETE",
        "/v1/links/{vehicleId}",
        links.unlink_vehicle,
        "End a vehicle's open session now: the car left its charger",
        "sessions",
        ok=(200, Unlinked),
        errors=(404, 503),
    ),
    Endpoint(
        "GET",
        "/v1/analytics/performance/{vehicleId}",
        analytics.performance,
        "Charging efficiency of a vehicle over a window",
        "analytics",
        ok=(200, Performance),
        errors=(400, 404, 503),
        query=WINDOW,
    ),
    Endpoint(
        "GET",
        "/v1/analytics/performance/{vehicleId}/series",
        series.series,
        "A vehicle's AC, DC, efficiency, battery temperature and SoC, bucket by bucket",
        "analytics",
        ok=(200, Series),
        errors=(400, 404, 503),
        query=(*WINDOW, Query("bucket", "15m, 1h (default) or 1d")),
    ),
    Endpoint(
        "GET",
        "/v1/analytics/fleet",
        fleet.fleet,
        "Every vehicle's charging efficiency over a window, worst first",
        "analytics",
        ok=(200, FleetPage),
        errors=(400, 503),
        csv=True,
        query=(
            *WINDOW,
            Query("limit", "page size, 1 to 10000 (default 100)", "integer"),
            Query("cursor", "`next` of the previous page (it keeps that page's window)"),
            Query("alert", "true: only vehicles under the alert threshold", "boolean"),
            Query("format", "json (default) or csv; or ask with Accept: text/csv"),
        ),
    ),
    Endpoint(
        "GET",
        "/v1/links",
        links.list_links,
        "A vehicle's or a meter's charging sessions, newest first",
        "analytics",
        ok=(200, LinkPage),
        errors=(400, 503),
        query=(
            Query("vehicleId", "this vehicle's sessions (or give meterId)"),
            Query("meterId", "this meter's sessions"),
            Query("limit", "page size, 1 to 1000 (default 50)", "integer"),
            Query("startedBefore", "`next` of the previous page", format="date-time"),
        ),
    ),
    Endpoint(
        "GET",
        "/v1/devices",
        devices.silent,
        "Silent devices: their newest reading is older than a span, longest silent first",
        "status",
        ok=(200, SilentDevicePage),
        errors=(400, 503),
        query=(
            Query("silentFor", f"{devices.SPAN_RULE} (default SILENT_AFTER_S)"),
            Query("stream", "meter or vehicle (default both)"),
            Query("limit", "page size, 1 to 1000 (default 100)", "integer"),
            Query("cursor", "`next` of the previous page (it keeps that page's span and stream)"),
        ),
    ),
    Endpoint(
        "GET",
        "/v1/overview",
        operators.overview,
        "The fleet at a glance: devices seen, readings per second, rejections, state",
        "status",
        ok=(200, Overview),
    ),
    Endpoint(
        "GET",
        "/v1/status/meter/{meterId}",
        operators.meter_status,
        "Latest reading of a meter",
        "status",
        ok=(200, MeterStatus),
        errors=(404, 503),
    ),
    Endpoint(
        "GET",
        "/v1/status/vehicle/{vehicleId}",
        operators.vehicle_status,
        "Latest reading of a vehicle",
        "status",
        ok=(200, VehicleStatus),
        errors=(404, 503),
    ),
    Endpoint(
        "GET",
        "/v1/rejections",
        operators.rejections,
        "Rejected messages and readings, newest first",
        "status",
        ok=(200, RejectionPage),
        errors=(400, 503),
        query=(
            Query("limit", "page size, 1 to 1000 (default 100)", "integer"),
            Query("source", "mqtt or http"),
            Query("before", "only rejections with an id below this", "integer"),
        ),
    ),
    Endpoint(
        "GET",
        "/health",
        operators.health,
        "Liveness and readiness: database and broker (503 when either is down)",
        "status",
        ok=(200, Health),
        also=(503,),
    ),
    Endpoint(
        "GET",
        "/metrics",
        operators.metrics,
        "Prometheus metrics",
        "status",
        media_type="text/plain",
    ),
)
