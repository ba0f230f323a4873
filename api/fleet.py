"""The whole fleet's charging efficiency over a window (SPEC §6), worst first.

Every vehicle with readings in the window, of its own or of a meter linked to it, with the
same figures as `GET /v1/analytics/performance/{vehicleId}` (the same statement computes
them). Sorted by efficiency, lowest first, vehicles without AC energy last, then by id.
Pages follow a cursor that carries the window, the filter of the first page and the last
vehicle's sort key, so that paging through a window that ends "now" does not move it.

PostgreSQL sorts, filters and cuts the page (`db.analytics.fleet_page`); the route turns the
page's rows into JSON or CSV a few hundred at a time, giving the event loop a turn between
them (`api.streaming`): a page of 10,000 vehicles never holds the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from asyncpg import Record
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from api import cursors
from api.analytics import check_window, figures, reading_of, window_of
from api.auth import require
from api.body import limit_param, problem
from api.responses import ApiError
from api.state import reads_of, runtime_of
from api.streaming import csv_rows, json_object
from db import analytics
from ingest.readings import is_device_id

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
CSV_COLUMNS = (
    "vehicleId",
    "efficiencyRatio",
    "alert",
    "totalAcConsumedKwh",
    "totalDcDeliveredKwh",
    "avgBatteryTemp",
    "meterReadings",
    "vehicleReadings",
    "meters",
    "silentMeters",
)


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, [problem(field, message)])


def _flag(raw: str | None) -> bool:
    if raw is None or raw.lower() in ("false", "0", ""):
        return False
    if raw.lower() in ("true", "1"):
        return True
    raise _bad("alert", "must be true or false")


def encode_cursor(start: datetime, end: datetime, alert: bool, after: analytics.SortKey) -> str:
    state = {"start": start.isoformat(), "end": end.isoformat(), "alert": alert, "after": after}
    return cursors.encode(state)


def decode_cursor(raw: str) -> tuple[datetime, datetime, bool, analytics.SortKey]:
    try:
        state = cursors.decode(raw)
        start = datetime.fromisoformat(state["start"])
        end = datetime.fromisoformat(state["end"])
        group, ratio, vehicle = state["after"]
        if (
            start.tzinfo is None
            or end.tzinfo is None
            or not isinstance(state["alert"], bool)
            or group not in (0, 1)
            or isinstance(group, bool)
            or not isinstance(ratio, int | float)
            or isinstance(ratio, bool)
            or not isinstance(vehicle, str)
            or not (vehicle == "" or is_device_id(vehicle))
        ):
            raise ValueError("cursor fields")
        start.astimezone(UTC), end.astimezone(UTC)  # (within the calendar once in UTC)
    except cursors.FORGED:
        raise cursors.refused() from None
    return start, end, state["alert"], (group, float(ratio), vehicle)


def _wants_csv(request: Request) -> bool:
    wanted = request.query_params.get("format")
    if wanted is None:
        return "text/csv" in request.headers.get("accept", "")
    if wanted not in ("json", "csv"):
        raise _bad("format", "must be json or csv")
    return wanted == "csv"


@require("operator")
async def fleet(request: Request) -> Response:
    runtime = runtime_of(request)
    query = request.query_params
    limit = limit_param(query.get("limit"), default=DEFAULT_LIMIT, maximum=MAX_LIMIT)
    as_csv = _wants_csv(request)
    after = analytics.FIRST_KEY
    if query.get("cursor"):
        start, end, alert_only, after = decode_cursor(query["cursor"])
        try:  # (a cursor this route gave keeps the rules; one made up must too)
            check_window(start, end, runtime.settings)
        except ApiError:
            raise cursors.refused() from None
    else:
        start, end = window_of(request, runtime.settings)
        alert_only = _flag(query.get("alert"))
    threshold = runtime.settings.alert_efficiency_threshold
    read = reading_of(start, end, runtime.settings)
    async with reads_of(request).connection(analytics=True) as conn:
        page = await analytics.fleet_page(
            conn,
            read.pieces,
            read.start,
            read.end,
            alert_below=threshold if alert_only else None,
            after=after,
            limit=limit,
            raw_from=read.raw_from,
            silent_after_s=runtime.settings.silent_after_s,
        )
    next_cursor = (
        encode_cursor(start, end, alert_only, page.key(page.rows[-1])) if page.more else None
    )

    def row(record: Record) -> dict[str, Any]:
        return figures(analytics.vehicle_of(record, analytics.FLEET_OFFSET), threshold)

    if as_csv:
        return _csv(page.rows, row, next_cursor, request, limit, read.resolution)
    fields = {
        "window": {"startTime": start, "endTime": end},
        "resolution": read.resolution,
        "alertThreshold": threshold,
        "alertOnly": alert_only,
        "total": page.total,
        "next": next_cursor,
    }
    return StreamingResponse(
        json_object(fields, "vehicles", page.rows, row), media_type="application/json"
    )


def _csv_line(row: dict[str, Any]) -> list[Any]:
    return [
        row["vehicleId"],
        row["efficiencyRatio"] if row["efficiencyRatio"] is not None else "",
        "true" if row["alert"] else "false",
        row["totalAcConsumedKwh"],
        row["totalDcDeliveredKwh"],
        row["avgBatteryTemp"] if row["avgBatteryTemp"] is not None else "",
        row["readings"]["meter"],
        row["readings"]["vehicle"],
        " ".join(m["meterId"] for m in row["meters"]),
        " ".join(m["meterId"] for m in row["silentMeters"]),
    ]


def _csv(
    rows: list[Record],
    row: Callable[[Record], dict[str, Any]],
    next_cursor: str | None,
    request: Request,
    limit: int,
    resolution: str,
) -> Response:
    headers = {
        "Content-Disposition": 'attachment; filename="fleet-efficiency.csv"',
        "Resolution": resolution,  # (the JSON's `resolution`: reading or hour)
    }
    if next_cursor is not None:
        link = f"{request.url.path}?format=csv&limit={limit}&cursor={next_cursor}"
        headers["Link"] = f'<{link}>; rel="next"'
    return StreamingResponse(
        csv_rows(CSV_COLUMNS, rows, lambda r: _csv_line(row(r))),
        media_type="text/csv; charset=utf-8",
        headers=headers,
    )
