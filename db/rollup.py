"""The hourly roll-ups rebuilt from the history over a span of hours: for readings written
to the history by other means than the daemon's flush (a bulk import, the benchmarks' fleet
loaded with SQL). The flush keeps the roll-ups itself.

A rebuild replaces the hours it covers: it must not run while the daemon writes readings of
the same devices for those hours (their increments would be replaced too). Name the devices
to rebuild only theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from db.analytics import CLAMP
from db.tables import METER, VEHICLE
from db.windows import ceil_hour, floor_hour

_DEVICES = "AND ($3::text[] IS NULL OR {column} = ANY($3))"

REBUILD_METERS = (
    f"""
DELETE FROM {METER.hourly} WHERE hour >= $1 AND hour < $2 {_DEVICES.format(column="meter_id")}""",
    f"""
INSERT INTO {METER.hourly} (meter_id, hour, kwh_consumed_ac, readings)
SELECT meter_id, date_trunc('hour', ts, 'UTC'),
       sum(least(kwh_consumed_ac, {CLAMP})), count(*)
FROM {METER.history} WHERE ts >= $1 AND ts < $2 {_DEVICES.format(column="meter_id")}
GROUP BY 1, 2""",
)
REBUILD_VEHICLES = (
    f"""
DELETE FROM {VEHICLE.hourly}
WHERE hour >= $1 AND hour < $2 {_DEVICES.format(column="vehicle_id")}""",
    f"""
INSERT INTO {VEHICLE.hourly}
    (vehicle_id, hour, kwh_delivered_dc, readings, battery_temp_sum, last_ts, last_soc)
SELECT vehicle_id, date_trunc('hour', ts, 'UTC'),
       sum(least(kwh_delivered_dc, {CLAMP})), count(*), sum(battery_temp), max(ts),
       (array_agg(soc ORDER BY ts DESC))[1]
FROM {VEHICLE.history} WHERE ts >= $1 AND ts < $2 {_DEVICES.format(column="vehicle_id")}
GROUP BY 1, 2""",
)


async def rebuild(
    conn: asyncpg.Connection,
    start: datetime,
    end: datetime,
    *,
    meters: Sequence[str] | None = None,
    vehicles: Sequence[str] | None = None,
) -> None:
    """Every hour that [start, end) touches, again from the history, in one transaction:
    of every device, or of the meters and vehicles named."""
    lo, hi = floor_hour(start), ceil_hour(end)
    named = meters is not None or vehicles is not None
    async with conn.transaction():
        if not named or meters:
            for statement in REBUILD_METERS:
                await conn.execute(statement, lo, hi, list(meters) if meters else None)
        if not named or vehicles:
            for statement in REBUILD_VEHICLES:
                await conn.execute(statement, lo, hi, list(vehicles) if vehicles else None)
