"""The whole fleet's charging efficiency over a window (SPEC §6), worst first.

Every vehicle with readings in the window, of its own or of a meter linked to it, with the
same figures as `GET /v1/analytics/performance/{vehicleId}` (the same statement computes
them). Sorted by efficiency, lowest first, vehicles without AC energy last, then by id.
Pages follow a cursor that carries the window and the filter of the first page, so that
paging through a window that ends "now" does not move it.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from api.analytics import check_window, figures, pieces_of, ratio, window_of
from api.auth import require
from api.body import limit_param, problem
from api.database import connection
from api.responses import JSON, ApiError
from api.state import runtime_of
from db import analytics

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
)
SortKey = tuple[int, float, str]


def sort_key(vehicle_id: str, ratio: float | None) -> SortKey:
    return (0, ratio, vehicle_id) if ratio is not None else (1, 0.0, vehicle_id)


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, [problem(field, message)])


def _flag(raw: str | None) -> bool:
    if raw is None or raw.lower() in ("false", "0", ""):
        return False
    if raw.lower() in ("true", "1"):
        return True
    raise _bad("alert", "must be true or false")


def encode_cursor(start: datetime, end: datetime, alert: bool, after: SortKey) -> str:
    state = {"start": start.isoformat(), "end": end.isoformat(), "alert": alert, "after": after}
    return base64.urlsafe_b64encode(orjson.dumps(state)).decode().rstrip("=")


def decode_cursor(raw: str) -> tuple[datetime, datetime, bool, SortKey]:
    try:
        state = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
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
        ):
            raise ValueError("cursor fields")
        start.astimezone(UTC), end.astimezone(UTC)  # (within the calendar once in UTC)
    except (
        binascii.Error,
        orjson.JSONDecodeError,
        KeyError,
        TypeError,
        ValueError,
        OverflowError,
    ):
        raise _bad("cursor", "not a cursor this route gave (use `next` as it came)") from None
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
    after: SortKey | None = None
    if query.get("cursor"):
        start, end, alert_only, after = decode_cursor(query["cursor"])
        try:  # (a cursor this route gave keeps the rules; one made up must too)
            check_window(start, end, runtime.settings)
        except ApiError:
            raise _bad("cursor", "not a cursor this route gave (use `next` as it came)") from None
    else:
        start, end = window_of(request, runtime.settings)
        alert_only = _flag(query.get("alert"))
    async with connection(runtime) as conn:
        vehicles = await analytics.fleet_window(conn, pieces_of(start, end), start, end)
    threshold = runtime.settings.alert_efficiency_threshold
    # Every vehicle is sorted, only the page is written out (a fleet of 10,000 has its
    # figures built 100 at a time).
    ranked = [(sort_key(v.vehicle_id, ratio(v.dc_kwh, v.ac_kwh)), v) for v in vehicles]
    if alert_only:
        ranked = [(key, v) for key, v in ranked if key[0] == 0 and key[1] < threshold]
    ranked.sort(key=lambda pair: pair[0])
    total = len(ranked)
    if after is not None:
        ranked = [(key, v) for key, v in ranked if key > after]
    page = [figures(v, threshold) for _, v in ranked[:limit]]
    next_cursor = (
        encode_cursor(start, end, alert_only, ranked[limit - 1][0]) if len(ranked) > limit else None
    )
    if as_csv:
        return _csv(page, next_cursor, request, limit)
    return JSON(
        {
            "window": {"startTime": start, "endTime": end},
            "alertThreshold": threshold,
            "alertOnly": alert_only,
            "total": total,
            "vehicles": page,
            "next": next_cursor,
        }
    )


def _csv(
    page: list[dict[str, Any]], next_cursor: str | None, request: Request, limit: int
) -> Response:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in page:
        writer.writerow(
            [
                row["vehicleId"],
                row["efficiencyRatio"] if row["efficiencyRatio"] is not None else "",
                "true" if row["alert"] else "false",
                row["totalAcConsumedKwh"],
                row["totalDcDeliveredKwh"],
                row["avgBatteryTemp"] if row["avgBatteryTemp"] is not None else "",
                row["readings"]["meter"],
                row["readings"]["vehicle"],
                " ".join(m["meterId"] for m in row["meters"]),
            ]
        )
    headers = {"Content-Disposition": 'attachment; filename="fleet-efficiency.csv"'}
    if next_cursor is not None:
        link = f"{request.url.path}?format=csv&limit={limit}&cursor={next_cursor}"
        headers["Link"] = f'<{link}>; rel="next"'
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)
