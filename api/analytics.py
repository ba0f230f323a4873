"""Charging efficiency of one vehicle (SPEC §6); the window rules every analytics route
shares."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request

from api.auth import require
from api.body import problem
from api.responses import JSON, ApiError
from api.state import reads_of, runtime_of
from db import analytics
from db.partitions import raw_history_start
from db.windows import Piece, pieces, rounded
from ingest.config import Settings
from ingest.readings import OUT_OF_CALENDAR, from_iso, is_device_id

KWH_DECIMALS = 6
RATIO_DECIMALS = 4


def instant(raw: str, name: str) -> datetime:
    # A '+' of an offset arrives as a space when the client did not URL-encode it.
    text = raw.strip().replace(" ", "+")
    try:
        value = from_iso(text)
    except ValueError:
        raise ApiError(
            400, [problem(name, "must be ISO 8601, e.g. 2026-01-01T00:00:00Z")]
        ) from None
    if value.tzinfo is None:
        raise ApiError(400, [problem(name, "needs an offset (Z or +hh:mm)")])
    try:
        value.astimezone(UTC)  # (echoed with its own offset; checked to fit the calendar)
    except OverflowError:
        raise ApiError(400, [problem(name, OUT_OF_CALENDAR)]) from None
    return value


def window_of(request: Request, settings: Settings) -> tuple[datetime, datetime]:
    """startTime/endTime, defaulting to the last ANALYTICS_DEFAULT_WINDOW_H hours."""
    default = timedelta(hours=settings.analytics_default_window_h)
    raw_start = request.query_params.get("startTime")
    raw_end = request.query_params.get("endTime")
    end = instant(raw_end, "endTime") if raw_end else None
    start = instant(raw_start, "startTime") if raw_start else None
    now = datetime.now(UTC)
    if end is None:  # (start + default only while it stays before now: no overflow)
        end = start + default if start is not None and start <= now - default else now
    if start is None:
        try:
            start = end - default
        except OverflowError:  # a window reaching back before year 1
            raise ApiError(400, [problem("endTime", OUT_OF_CALENDAR)]) from None
    check_window(start, end, settings)
    return start, end


# A day's margin at each end of the calendar: a window's hours and buckets are rounded outwards
# (past 9999-12-31T23:00 that overflows Python's datetime), and asyncpg sends the calendar's
# last microsecond as PostgreSQL's `infinity` (a series of buckets that never ended).
EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, tzinfo=UTC)


def check_window(start: datetime, end: datetime, settings: Settings) -> None:
    """The rules every analytics window keeps, however it came (parameters or a cursor)."""
    if start < EARLIEST:
        raise ApiError(400, [problem("startTime", "must be on or after 0001-01-02T00:00:00Z")])
    if end > LATEST:
        raise ApiError(400, [problem("endTime", "must be on or before 9999-12-31T00:00:00Z")])
    if start >= end:
        raise ApiError(400, [problem("startTime", "must be before endTime")])
    longest = timedelta(days=settings.analytics_max_window_days)
    if end - start > longest:
        raise ApiError(
            400,
            [
                problem(
                    "endTime", f"window longer than {longest.days} days (ANALYTICS_MAX_WINDOW_DAYS)"
                )
            ],
        )


def ratio(dc_kwh: float, ac_kwh: float) -> float | None:
    """DC ÷ AC as every analytics route gives it; None without AC energy."""
    return round(dc_kwh / ac_kwh, RATIO_DECIMALS) if ac_kwh > 0 else None


def kwh(value: float) -> float:
    return round(value, KWH_DECIMALS) + 0.0  # (+ 0.0: never -0.0)


def temperature(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def unknown_vehicle(vehicle_id: str) -> ApiError:
    return ApiError(404, f"no vehicle {vehicle_id!r} has reported or been linked")


def alert(dc_kwh: float, ac_kwh: float, threshold: float) -> bool:
    """Under the threshold, by the ratio itself (not its rounding): the fleet's `alert=true`
    filter, run in PostgreSQL, decides the same way."""
    return ac_kwh > 0 and dc_kwh / ac_kwh < threshold


def figures(v: analytics.VehicleWindow, threshold: float) -> dict[str, Any]:
    """A vehicle's figures, as the per-vehicle route and each row of the fleet give them."""
    return {
        "vehicleId": v.vehicle_id,
        "totalAcConsumedKwh": kwh(v.ac_kwh),
        "totalDcDeliveredKwh": kwh(v.dc_kwh),
        "efficiencyRatio": ratio(v.dc_kwh, v.ac_kwh),
        "avgBatteryTemp": temperature(v.avg_battery_temp),
        "readings": {"meter": v.meter_readings, "vehicle": v.vehicle_readings},
        "meters": [
            {"meterId": m.meter_id, "acConsumedKwh": kwh(m.ac_kwh), "readings": m.readings}
            for m in v.meters
        ],
        "alert": alert(v.dc_kwh, v.ac_kwh, threshold),
        "silentMeters": [{"meterId": m, "lastReadingAt": at} for m, at in v.silent_meters],
    }


READING = "reading"  # every figure summed from the readings themselves (exact)
HOUR = "hour"  # part of the window is older than the raw history: whole hours of roll-ups


@dataclass(frozen=True, slots=True)
class Reading:
    """How a window is read: the window as asked, as read (rounded out to whole hours before
    the raw history kept), its pieces, and the resolution the answer says."""

    start: datetime
    end: datetime
    raw_from: datetime
    pieces: list[Piece]

    @property
    def resolution(self) -> str:
        return HOUR if self.start < self.raw_from else READING


def reading_of(start: datetime, end: datetime, settings: Settings) -> Reading:
    now = datetime.now(UTC)
    raw_from = raw_history_start(now, settings.retention_days)
    lo, hi = rounded(start, end, raw_from)
    return Reading(lo, hi, raw_from, pieces(lo, hi, now=now, raw_from=raw_from))


@require("operator")
async def performance(request: Request) -> JSON:
    runtime = runtime_of(request)
    vehicle_id = request.path_params["vehicleId"]
    start, end = window_of(request, runtime.settings)
    if not is_device_id(vehicle_id):  # (never stored: no need to ask the database)
        raise unknown_vehicle(vehicle_id)
    read = reading_of(start, end, runtime.settings)
    async with reads_of(request).connection(analytics=True) as conn:
        totals = await analytics.vehicle_window(
            conn,
            vehicle_id,
            read.pieces,
            read.start,
            read.end,
            read.raw_from,
            silent_after_s=runtime.settings.silent_after_s,
        )
    if totals is None:
        raise unknown_vehicle(vehicle_id)
    threshold = runtime.settings.alert_efficiency_threshold
    body = figures(totals, threshold)
    return JSON(
        {
            "vehicleId": body.pop("vehicleId"),
            "window": {"startTime": start, "endTime": end},
            "resolution": read.resolution,
            **body,
            "alertThreshold": threshold,
        }
    )
