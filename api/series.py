"""A vehicle's efficiency over time, bucket by bucket (SPEC §6): for charts."""

from __future__ import annotations

from starlette.requests import Request

from api.analytics import KWH_DECIMALS, RATIO_DECIMALS, window_of
from api.auth import require
from api.body import problem
from api.database import connection
from api.responses import JSON, ApiError
from api.state import runtime_of
from daemon.readings import is_device_id
from db import analytics
from db.series import BUCKETS, vehicle_series


@require("operator")
async def series(request: Request) -> JSON:
    runtime = runtime_of(request)
    vehicle_id = request.path_params["vehicleId"]
    start, end = window_of(request, runtime.settings)
    bucket = request.query_params.get("bucket", "1h")
    if bucket not in BUCKETS:
        raise ApiError(400, [problem("bucket", f"must be one of {', '.join(BUCKETS)}")])
    unknown = ApiError(404, f"no vehicle {vehicle_id!r} has reported or been linked")
    if not is_device_id(vehicle_id):
        raise unknown
    async with connection(runtime) as conn:
        if not await conn.fetchval(analytics.VEHICLE_KNOWN, vehicle_id):
            raise unknown
        buckets = await vehicle_series(conn, vehicle_id, start, end, bucket)
    return JSON(
        {
            "vehicleId": vehicle_id,
            "window": {"startTime": start, "endTime": end},
            "bucket": bucket,
            "series": [
                {
                    "start": b.start,
                    "acKwh": round(b.ac_kwh, KWH_DECIMALS) + 0.0,
                    "dcKwh": round(b.dc_kwh, KWH_DECIMALS) + 0.0,
                    "efficiencyRatio": (
                        round(b.dc_kwh / b.ac_kwh, RATIO_DECIMALS) if b.ac_kwh > 0 else None
                    ),
                    "avgBatteryTemp": (
                        round(b.avg_battery_temp, 3) if b.avg_battery_temp is not None else None
                    ),
                    "lastSoc": b.last_soc,
                    "readings": {"meter": b.meter_readings, "vehicle": b.vehicle_readings},
                }
                for b in buckets
            ],
        }
    )
