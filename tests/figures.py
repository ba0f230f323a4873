"""A vehicle's figures over a window computed independently of the daemon: plain SQL over the
raw readings and the sessions, for the analytics and dashboard tests to compare with."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

INDEPENDENT_DC = """
SELECT coalesce(sum(kwh_delivered_dc), 0) AS kwh, count(*) AS n, avg(battery_temp) AS temp
FROM vehicle_readings WHERE vehicle_id = $1 AND ts >= $2 AND ts < $3"""
INDEPENDENT_AC = """
SELECT s.meter_id, count(m.ts) AS n, coalesce(sum(m.kwh_consumed_ac), 0) AS kwh
FROM charging_sessions s
LEFT JOIN meter_readings m ON m.meter_id = s.meter_id
 AND m.ts >= greatest(s.started_at, $2) AND m.ts < least(coalesce(s.ended_at, 'infinity'), $3)
WHERE s.vehicle_id = $1 AND s.started_at < $3 AND (s.ended_at IS NULL OR s.ended_at > $2)
GROUP BY s.meter_id ORDER BY s.meter_id"""


async def independent(
    db: asyncpg.Connection, vehicle: str, start: datetime, end: datetime
) -> dict[str, Any]:
    dc = await db.fetchrow(INDEPENDENT_DC, vehicle, start, end)
    meters = await db.fetch(INDEPENDENT_AC, vehicle, start, end)
    ac = sum(m["kwh"] for m in meters)
    return {
        "totalAcConsumedKwh": round(ac, 6),
        "totalDcDeliveredKwh": round(dc["kwh"], 6),
        "readings": {"meter": sum(m["n"] for m in meters), "vehicle": dc["n"]},
        "avgBatteryTemp": round(dc["temp"], 3) if dc["temp"] is not None else None,
        "meters": [(m["meter_id"], m["n"], round(m["kwh"], 6)) for m in meters],
        "efficiencyRatio": round(dc["kwh"] / ac, 4) if ac > 0 else None,
    }
