"""A vehicle's efficiency over time, bucket by bucket (SPEC §6): for charts."""

from __future__ import annotations

from starlette.requests import Request

from api.analytics import HOUR, kwh, ratio, reading_of, temperature, unknown_vehicle, window_of
from api.auth import require
from api.body import problem
from api.responses import JSON, ApiError
from api.state import reads_of, runtime_of
from db import analytics
from db.series import BUCKETS, ROLLED_UP, vehicle_series
from ingest.readings import is_device_id

_TOO_FINE = (
    "{} buckets need the raw readings, kept from {:%Y-%m-%dT%H:%MZ} (RETENTION_DAYS); "
    "this window starts before them: use 1h or 1d"
)


@require("operator")
async def series(request: Request) -> JSON:
    runtime = runtime_of(request)
    vehicle_id = request.path_params["vehicleId"]
    start, end = window_of(request, runtime.settings)
    bucket = request.query_params.get("bucket", "1h")
    if bucket not in BUCKETS:
        raise ApiError(400, [problem("bucket", f"must be one of {', '.join(BUCKETS)}")])
    read = reading_of(start, end, runtime.settings)
    if read.resolution == HOUR and bucket not in ROLLED_UP:
        raise ApiError(400, [problem("bucket", _TOO_FINE.format(bucket, read.raw_from))])
    if not is_device_id(vehicle_id):  # (never stored: no need to ask the database)
        raise unknown_vehicle(vehicle_id)
    async with reads_of(request).connection(analytics=True) as conn:
        if not await analytics.vehicle_known(conn, vehicle_id):
            raise unknown_vehicle(vehicle_id)
        buckets = await vehicle_series(
            conn, vehicle_id, read.start, read.end, bucket, read.raw_from
        )
    return JSON(
        {
            "vehicleId": vehicle_id,
            "window": {"startTime": start, "endTime": end},
            "resolution": read.resolution,
            "bucket": bucket,
            "series": [
                {
                    "start": b.start,
                    "acKwh": kwh(b.ac_kwh),
                    "dcKwh": kwh(b.dc_kwh),
                    "efficiencyRatio": ratio(b.dc_kwh, b.ac_kwh),
                    "avgBatteryTemp": temperature(b.avg_battery_temp),
                    "lastSoc": b.last_soc,
                    "readings": {"meter": b.meter_readings, "vehicle": b.vehicle_readings},
                }
                for b in buckets
            ],
        }
    )
