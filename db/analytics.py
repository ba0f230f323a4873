"""Charging efficiency of a vehicle over a window (SPEC §5, §6).

DC is what the vehicle reported in the window. AC is what its meters measured while each was
linked to it: every session overlapping the window contributes the readings of its meter
between max(session start, window start) and min(session end, window end), half-open.

Both queries read the history through its primary key (device id, ts) and repeat the window
bounds as plain conditions on `ts`, so that PostgreSQL prunes every partition outside the
window: the cost depends on the window, not on how much history is stored.

Energy is summed as `numeric`: a float8 sum overflows (22003) past 1.8e308, which rows stored
before MAX_KWH_PER_READING existed can reach; the totals come back as text and are read as
floats (infinite, then, rather than an error).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg
import orjson

from db.tables import METER, SESSIONS, VEHICLE

VEHICLE_TOTALS = f"""
SELECT count(*) AS readings,
       coalesce(sum(kwh_delivered_dc::numeric), 0)::text AS dc_kwh,
       avg(battery_temp) AS avg_battery_temp
FROM {VEHICLE.history}
WHERE vehicle_id = $1 AND ts >= $2 AND ts < $3"""

METER_TOTALS = f"""
SELECT s.meter_id, count(m.ts) AS readings,
       coalesce(sum(m.kwh_consumed_ac::numeric), 0)::text AS ac_kwh
FROM {SESSIONS} s
LEFT JOIN LATERAL (
    SELECT ts, kwh_consumed_ac FROM {METER.history} m
    WHERE m.meter_id = s.meter_id
      AND m.ts >= $2 AND m.ts < $3
      AND m.ts >= s.started_at AND (s.ended_at IS NULL OR m.ts < s.ended_at)
) m ON true
WHERE s.vehicle_id = $1 AND s.started_at < $3 AND (s.ended_at IS NULL OR s.ended_at > $2)
GROUP BY s.meter_id
ORDER BY s.meter_id"""

VEHICLE_KNOWN = f"""
SELECT EXISTS (SELECT 1 FROM {VEHICLE.latest} WHERE vehicle_id = $1)
    OR EXISTS (SELECT 1 FROM {SESSIONS} WHERE vehicle_id = $1)"""

# All three in one round trip: the route's latency is mostly round trips.
PERFORMANCE = f"""
WITH dc AS ({VEHICLE_TOTALS}), ac AS ({METER_TOTALS})
SELECT ({VEHICLE_KNOWN}) AS known, dc.readings, dc.dc_kwh, dc.avg_battery_temp,
       (SELECT coalesce(json_agg(json_build_array(meter_id, readings, ac_kwh)
                                 ORDER BY meter_id), '[]')
        FROM ac)::text AS meters
FROM dc"""


@dataclass(frozen=True, slots=True)
class MeterTotal:
    meter_id: str
    readings: int
    ac_kwh: float


@dataclass(frozen=True, slots=True)
class VehicleWindow:
    dc_kwh: float
    vehicle_readings: int
    avg_battery_temp: float | None
    meters: list[MeterTotal]

    @property
    def ac_kwh(self) -> float:
        return sum(m.ac_kwh for m in self.meters)


async def vehicle_window(
    conn: asyncpg.Connection, vehicle_id: str, start: datetime, end: datetime
) -> VehicleWindow | None:
    """The vehicle's totals over [start, end), or None for a vehicle never seen."""
    row = await conn.fetchrow(PERFORMANCE, vehicle_id, start, end)
    if not row["known"]:
        return None
    meters = [MeterTotal(m, int(n), float(kwh)) for m, n, kwh in orjson.loads(row["meters"])]
    return VehicleWindow(float(row["dc_kwh"]), row["readings"], row["avg_battery_temp"], meters)
