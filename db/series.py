"""A vehicle's efficiency over time, in buckets of 15 minutes, an hour or a day (for charts).

Hour and day buckets add up the hourly roll-ups of the whole hours inside the window (and,
for AC, inside each session linking a meter to the vehicle) and the raw readings of the
partial hours at their edges; 15-minute buckets are finer than the roll-ups and read the raw
readings. A bucket's last SoC is that of its newest reading.

A window that starts before the raw history kept is read from the roll-ups alone before it
(`db.windows.rounded`: whole hours; sessions' bounds to the next hour, `$5`); 15-minute buckets
need the raw readings, and are not answered there.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from db.analytics import CLAMP, NO_LIMIT, ceil_hour_sql, read
from db.tables import METER, SESSIONS, VEHICLE

BUCKETS = {"15m": timedelta(minutes=15), "1h": timedelta(hours=1), "1d": timedelta(days=1)}
ORIGIN = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"  # a UTC midnight: buckets align to the clock


def _snapped(column: str) -> str:
    """As `db.analytics.snapped_sql`, with the raw history's start in $5."""
    return f"CASE WHEN {column} < $5 THEN {ceil_hour_sql(column)} ELSE {column} END"


# Parameters: $1 vehicle, $2 start, $3 end, $4 bucket width, $5 the raw history's start.
_ROLLED_UP = f"""
WITH bounds AS (
    SELECT {ceil_hour_sql("$2")} AS hs, date_trunc('hour', $3, 'UTC') AS he
),
dc AS (
    SELECT date_bin($4, h.hour, {ORIGIN}) AS bucket, least(h.kwh_delivered_dc, {CLAMP}) AS kwh,
           h.readings AS n, h.battery_temp_sum AS temp, h.last_ts AS ts, h.last_soc AS soc
    FROM {VEHICLE.hourly_all} h, bounds
    WHERE h.vehicle_id = $1 AND h.hour >= bounds.hs AND h.hour < bounds.he
      AND h.hour >= date_trunc('hour', $2, 'UTC') AND h.hour < $3
    UNION ALL
    SELECT date_bin($4, v.ts, {ORIGIN}), least(v.kwh_delivered_dc, {CLAMP}), 1, v.battery_temp,
           v.ts, v.soc
    FROM {VEHICLE.history} v, bounds
    WHERE v.vehicle_id = $1 AND v.ts >= $2 AND v.ts < least(bounds.hs, $3)
    UNION ALL
    SELECT date_bin($4, v.ts, {ORIGIN}), least(v.kwh_delivered_dc, {CLAMP}), 1, v.battery_temp,
           v.ts, v.soc
    FROM {VEHICLE.history} v, bounds
    WHERE v.vehicle_id = $1 AND v.ts >= greatest(bounds.he, bounds.hs, $2) AND v.ts < $3
),
iv AS (
    SELECT s.meter_id, {_snapped("greatest(s.started_at, $2)")} AS a,
           {_snapped("least(coalesce(s.ended_at, 'infinity'), $3)")} AS b
    FROM {SESSIONS} s
    WHERE s.vehicle_id = $1 AND tstzrange(s.started_at, s.ended_at) && tstzrange($2, $3)
),
edges AS (
    SELECT meter_id, a, b, {ceil_hour_sql("a")} AS ha, date_trunc('hour', b, 'UTC') AS hb
    FROM iv
),
ac AS (
    SELECT date_bin($4, h.hour, {ORIGIN}) AS bucket, least(h.kwh_consumed_ac, {CLAMP}) AS kwh,
           h.readings AS n
    FROM edges e JOIN {METER.hourly_all} h
      ON h.meter_id = e.meter_id AND h.hour >= e.ha AND h.hour < e.hb
    WHERE h.hour >= date_trunc('hour', $2, 'UTC') AND h.hour < $3
    UNION ALL
    SELECT date_bin($4, m.ts, {ORIGIN}), least(m.kwh_consumed_ac, {CLAMP}), 1
    FROM edges e JOIN {METER.history} m
      ON m.meter_id = e.meter_id AND m.ts >= e.a AND m.ts < least(e.ha, e.b)
    WHERE m.ts >= $2 AND m.ts < $3
    UNION ALL
    SELECT date_bin($4, m.ts, {ORIGIN}), least(m.kwh_consumed_ac, {CLAMP}), 1
    FROM edges e JOIN {METER.history} m
      ON m.meter_id = e.meter_id AND m.ts >= greatest(e.hb, e.ha) AND m.ts < e.b
    WHERE m.ts >= $2 AND m.ts < $3
)"""

# Finer than an hour: the raw readings.
_RAW = f"""
WITH dc AS (
    SELECT date_bin($4, v.ts, {ORIGIN}) AS bucket, least(v.kwh_delivered_dc, {CLAMP}) AS kwh,
           1 AS n, v.battery_temp AS temp, v.ts, v.soc
    FROM {VEHICLE.history} v WHERE v.vehicle_id = $1 AND v.ts >= $2 AND v.ts < $3
),
ac AS (
    SELECT date_bin($4, m.ts, {ORIGIN}) AS bucket, least(m.kwh_consumed_ac, {CLAMP}) AS kwh, 1 AS n
    FROM {SESSIONS} s JOIN {METER.history} m
      ON m.meter_id = s.meter_id AND m.ts >= s.started_at
     AND (s.ended_at IS NULL OR m.ts < s.ended_at)
    WHERE s.vehicle_id = $1 AND tstzrange(s.started_at, s.ended_at) && tstzrange($2, $3)
      AND m.ts >= $2 AND m.ts < $3
)"""

_BUCKETED = """
SELECT b.bucket, a.kwh AS ac_kwh, a.n AS meter_readings, d.kwh AS dc_kwh,
       d.n AS vehicle_readings, d.temp AS battery_temp_sum, d.soc AS last_soc
FROM generate_series(date_bin($4, $2, {origin}), $3 - interval '1 microsecond', $4) AS b(bucket)
LEFT JOIN (
    SELECT bucket, sum(kwh) AS kwh, sum(n)::bigint AS n, sum(temp) AS temp,
           (array_agg(soc ORDER BY ts DESC))[1] AS soc
    FROM dc GROUP BY bucket
) d USING (bucket)
LEFT JOIN (SELECT bucket, sum(kwh) AS kwh, sum(n)::bigint AS n FROM ac GROUP BY bucket) a
    USING (bucket)
ORDER BY b.bucket"""

ROLLED_UP = ("1h", "1d")  # the buckets read from the roll-ups
SERIES = {
    "15m": _RAW + _BUCKETED.format(origin=ORIGIN),
    "1h": _ROLLED_UP + _BUCKETED.format(origin=ORIGIN),
    "1d": _ROLLED_UP + _BUCKETED.format(origin=ORIGIN),
}


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime
    ac_kwh: float
    meter_readings: int
    dc_kwh: float
    vehicle_readings: int
    avg_battery_temp: float | None
    last_soc: float | None


async def vehicle_series(
    conn: asyncpg.Connection,
    vehicle_id: str,
    start: datetime,
    end: datetime,
    bucket: str,
    raw_from: datetime | None = None,
) -> list[Bucket]:
    """Before `raw_from`, the window must be `db.windows.rounded` and the bucket 1h or 1d."""
    args = [vehicle_id, start, end, BUCKETS[bucket]]
    if bucket in ROLLED_UP:
        args.append(raw_from or NO_LIMIT)
    rows = await read(conn, SERIES[bucket], *args)
    out = []
    for r in rows:
        vehicle_n = int(r["vehicle_readings"] or 0)
        meter_n = int(r["meter_readings"] or 0)
        out.append(
            Bucket(
                start=r["bucket"],
                ac_kwh=float(r["ac_kwh"]) if meter_n else 0.0,
                meter_readings=meter_n,
                dc_kwh=float(r["dc_kwh"]) if vehicle_n else 0.0,
                vehicle_readings=vehicle_n,
                avg_battery_temp=r["battery_temp_sum"] / vehicle_n if vehicle_n else None,
                last_soc=r["last_soc"] if vehicle_n else None,
            )
        )
    return out
