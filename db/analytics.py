"""Charging efficiency over a window (SPEC §5, §6): one vehicle, the whole fleet, and a
vehicle's series of buckets for charts.

DC is what a vehicle reported in the window. AC is what its meters measured while each was
linked to it: every session overlapping the window contributes its meter's readings between
max(session start, window start) and min(session end, window end), half-open.

Sums come from the hourly roll-ups for whole hours and from the raw readings for the parts of
hours at the window's edges (db/windows.py decides which). Sessions that cover the whole
window share the window's pieces; one that starts or ends inside it is summed over its own
hours and edges. One vehicle and the fleet run the same statement (the vehicle's names it),
so their numbers agree; the cost depends on the window and the fleet's size, not on how much
history is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from db.tables import METER, SESSIONS, VEHICLE
from db.windows import HOURLY, RAW, Piece

# A reading over this many kWh cannot be stored any more (MAX_KWH_PER_READING), but rows
# stored before that bound existed can hold up to 1.8e308, and summing two overflows float8
# (22003): each is read as at most this much, so a window's sum always fits.
CLAMP = "1e300"

# Window start and end are $1 and $2; each piece's bounds follow ($3, $4, ...); the vehicle,
# for one vehicle's figures, comes last.
FIRST_PIECE_PARAM = 3


async def read(
    conn: asyncpg.Connection, sql: str, *args: Any, generic: bool = False
) -> list[asyncpg.Record]:
    """An analytics statement in a read-only transaction of its own, with settings for it
    alone (SET LOCAL ends with the transaction: nothing stays on the connection, through a
    transaction pooler too):

    - no JIT compilation: the fleet's statement passes `jit_above_cost` and spent 50-150 ms
      of a 200 ms answer compiling itself (BENCHMARKS.md, fleet);
    - `generic`, for one vehicle's statements: the prepared statement's generic plan, whose
      partitions are pruned when it runs. PostgreSQL's own choice compares the generic plan's
      cost, counted over *every* partition, with a plan made for the parameters, and so
      planned again at every call once a month of partitions existed: 2.5 ms a call with 30
      days stored against 0.4 ms with one (BENCHMARKS.md, analytics).
    """
    settings = "SET LOCAL jit = off"
    if generic:
        settings += "; SET LOCAL plan_cache_mode = force_generic_plan"
    async with conn.transaction(readonly=True):
        await conn.execute(settings)
        records: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return records


def ceil_hour_sql(column: str) -> str:
    """SQL for the first whole hour at or after `column` (UTC)."""
    floor = f"date_trunc('hour', {column}, 'UTC')"
    return f"{floor} + CASE WHEN {floor} < {column} THEN interval '1 hour' ELSE interval '0' END"


def _parts(window: list[Piece], branches: dict[str, str]) -> str:
    """One branch of UNION ALL per piece, its bounds as parameters (so that PostgreSQL
    prunes partitions and plans each range for what it is) and its sign in the text."""
    parts = []
    for n, piece in enumerate(window):
        lo, hi = FIRST_PIECE_PARAM + 2 * n, FIRST_PIECE_PARAM + 2 * n + 1
        parts.append(branches[piece.kind].format(sign=piece.sign, lo=f"${lo}", hi=f"${hi}"))
    return "\n        UNION ALL".join(parts) or "\n        SELECT NULL, 0, 0, 0 WHERE false"


def _window_sql(window: list[Piece], *, one_vehicle: bool) -> str:
    """Rows of (vehicle, meter): the vehicle's DC figures (repeated on each of its meters'
    rows) and the AC its meter measured while linked to it, over the window."""
    vehicle_param = f"${FIRST_PIECE_PARAM + 2 * len(window)}"
    vehicle = f"AND {{alias}}.vehicle_id = {vehicle_param}" if one_vehicle else ""
    its_meters = f"SELECT meter_id FROM {SESSIONS} WHERE vehicle_id = {vehicle_param}"
    meter = f"AND {{alias}}.meter_id IN ({its_meters})" if one_vehicle else ""
    h_vehicle, v_vehicle = vehicle.format(alias="h"), vehicle.format(alias="v")
    h_meter, m_meter = meter.format(alias="h"), meter.format(alias="m")
    dc_parts = _parts(
        window,
        {
            HOURLY: f"""
        SELECT h.vehicle_id, {{sign}} * least(h.kwh_delivered_dc, {CLAMP}), {{sign}} * h.readings,
               {{sign}} * h.battery_temp_sum
        FROM {VEHICLE.hourly} h WHERE h.hour >= {{lo}} AND h.hour < {{hi}} {h_vehicle}""",
            RAW: f"""
        SELECT v.vehicle_id, {{sign}} * least(v.kwh_delivered_dc, {CLAMP}), {{sign}},
               {{sign}} * v.battery_temp
        FROM {VEHICLE.history} v WHERE v.ts >= {{lo}} AND v.ts < {{hi}} {v_vehicle}""",
        },
    )
    ac_parts = _parts(
        window,
        {
            HOURLY: f"""
        SELECT h.meter_id, {{sign}} * least(h.kwh_consumed_ac, {CLAMP}), {{sign}} * h.readings, 0
        FROM {METER.hourly} h WHERE h.hour >= {{lo}} AND h.hour < {{hi}} {h_meter}""",
            RAW: f"""
        SELECT m.meter_id, {{sign}} * least(m.kwh_consumed_ac, {CLAMP}), {{sign}}, 0
        FROM {METER.history} m WHERE m.ts >= {{lo}} AND m.ts < {{hi}} {m_meter}""",
        },
    )
    return f"""
WITH dc AS (
    SELECT vehicle_id, sum(kwh) AS kwh, sum(n)::bigint AS n, sum(temp) AS temp
    FROM ({dc_parts}
    ) parts (vehicle_id, kwh, n, temp) GROUP BY vehicle_id
),
meter_window AS (
    SELECT meter_id, sum(kwh) AS kwh, sum(n)::bigint AS n
    FROM ({ac_parts}
    ) parts (meter_id, kwh, n, unused) GROUP BY meter_id
),
iv AS (
    SELECT s.vehicle_id, s.meter_id,
           greatest(s.started_at, $1) AS a, least(coalesce(s.ended_at, 'infinity'), $2) AS b,
           s.started_at <= $1 AND (s.ended_at IS NULL OR s.ended_at >= $2) AS whole
    FROM {SESSIONS} s
    WHERE s.started_at < $2 AND (s.ended_at IS NULL OR s.ended_at > $1)
      {vehicle.format(alias="s")}
),
edges AS (
    SELECT vehicle_id, meter_id, a, b, {ceil_hour_sql("a")} AS ha,
           date_trunc('hour', b, 'UTC') AS hb
    FROM iv WHERE NOT whole
),
partial AS (
    SELECT vehicle_id, meter_id, sum(kwh) AS kwh, sum(n)::bigint AS n FROM (
        SELECT e.vehicle_id, e.meter_id, least(h.kwh_consumed_ac, {CLAMP}) AS kwh, h.readings AS n
        FROM edges e JOIN {METER.hourly} h
          ON h.meter_id = e.meter_id AND h.hour >= e.ha AND h.hour < e.hb
        WHERE h.hour >= date_trunc('hour', $1, 'UTC') AND h.hour < $2
        UNION ALL
        SELECT e.vehicle_id, e.meter_id, least(m.kwh_consumed_ac, {CLAMP}), 1
        FROM edges e JOIN {METER.history} m
          ON m.meter_id = e.meter_id AND m.ts >= e.a AND m.ts < least(e.ha, e.b)
        WHERE m.ts >= $1 AND m.ts < $2
        UNION ALL
        SELECT e.vehicle_id, e.meter_id, least(m.kwh_consumed_ac, {CLAMP}), 1
        FROM edges e JOIN {METER.history} m
          ON m.meter_id = e.meter_id AND m.ts >= greatest(e.hb, e.ha) AND m.ts < e.b
        WHERE m.ts >= $1 AND m.ts < $2
    ) parts GROUP BY vehicle_id, meter_id
),
ac AS (
    SELECT i.vehicle_id, i.meter_id, coalesce(w.kwh, 0) AS kwh, coalesce(w.n, 0) AS n
    FROM iv i LEFT JOIN meter_window w USING (meter_id) WHERE i.whole
    UNION ALL
    SELECT l.vehicle_id, l.meter_id, coalesce(p.kwh, 0), coalesce(p.n, 0)
    FROM (SELECT DISTINCT vehicle_id, meter_id FROM iv WHERE NOT whole) l
    LEFT JOIN partial p USING (vehicle_id, meter_id)
)
SELECT coalesce(dc.vehicle_id, ac.vehicle_id) AS vehicle_id,
       coalesce(dc.kwh, 0) AS dc_kwh, coalesce(dc.n, 0) AS vehicle_readings,
       dc.temp AS battery_temp_sum, ac.meter_id, ac.kwh AS ac_kwh, ac.n AS meter_readings
FROM dc FULL JOIN ac USING (vehicle_id)"""


VEHICLE_KNOWN = f"""
SELECT EXISTS (SELECT 1 FROM {VEHICLE.latest} WHERE vehicle_id = $1)
    OR EXISTS (SELECT 1 FROM {SESSIONS} WHERE vehicle_id = $1)"""


async def vehicle_known(conn: asyncpg.Connection, vehicle_id: str) -> bool:
    """Has the vehicle reported, or been linked to a meter?"""
    return bool(await conn.fetchval(VEHICLE_KNOWN, vehicle_id))


@dataclass(frozen=True, slots=True)
class MeterTotal:
    meter_id: str
    readings: int
    ac_kwh: float


@dataclass(frozen=True, slots=True)
class VehicleWindow:
    vehicle_id: str
    dc_kwh: float
    vehicle_readings: int
    battery_temp_sum: float | None
    meters: list[MeterTotal]

    @property
    def ac_kwh(self) -> float:
        return sum(m.ac_kwh for m in self.meters)

    @property
    def avg_battery_temp(self) -> float | None:
        if not self.vehicle_readings or self.battery_temp_sum is None:
            return None
        return self.battery_temp_sum / self.vehicle_readings


def _energy(kwh: float, readings: int) -> float:
    # An hour's roll-up minus the readings outside the window can leave a float's last bit
    # where no reading is: with no reading there is no energy.
    return float(kwh) if readings else 0.0


def _merged(meters: list[MeterTotal]) -> list[MeterTotal]:
    """One line per meter, in id order (one meter can serve a vehicle in two sessions of
    the window)."""
    if len(meters) < 2:
        return meters
    merged: dict[str, MeterTotal] = {}
    for m in meters:
        seen = merged.get(m.meter_id)
        merged[m.meter_id] = (
            m
            if seen is None
            else MeterTotal(m.meter_id, seen.readings + m.readings, seen.ac_kwh + m.ac_kwh)
        )
    return [merged[m] for m in sorted(merged)]


def _vehicles(records: list[asyncpg.Record]) -> list[VehicleWindow]:
    """Rows of (vehicle, meter) gathered by vehicle. (Run for every vehicle of a fleet on
    every request: columns by position, one pass.)"""
    rows: dict[str, tuple[asyncpg.Record, list[MeterTotal]]] = {}
    for record in records:
        vehicle_id, _, _, _, meter_id, ac_kwh, meter_readings = record
        found = rows.get(vehicle_id)
        if found is None:
            found = rows[vehicle_id] = (record, [])
        if meter_id is not None:
            n = int(meter_readings)
            found[1].append(MeterTotal(meter_id, n, _energy(ac_kwh, n)))
    vehicles = []
    for vehicle_id, (record, meters) in rows.items():
        readings = int(record[2])
        vehicles.append(
            VehicleWindow(
                vehicle_id,
                _energy(record[1], readings),
                readings,
                record[3] if readings else None,
                _merged(meters),
            )
        )
    return vehicles


def _args(window: list[Piece], start: datetime, end: datetime) -> list[Any]:
    return [start, end, *(bound for p in window for bound in (p.lo, p.hi))]


async def vehicle_window(
    conn: asyncpg.Connection,
    vehicle_id: str,
    window: list[Piece],
    start: datetime,
    end: datetime,
) -> VehicleWindow | None:
    """The vehicle's totals over [start, end), or None for a vehicle never seen."""
    if not await vehicle_known(conn, vehicle_id):
        return None
    sql = _window_sql(window, one_vehicle=True)
    found = _vehicles(await read(conn, sql, *_args(window, start, end), vehicle_id, generic=True))
    return found[0] if found else VehicleWindow(vehicle_id, 0.0, 0, None, [])


async def fleet_window(
    conn: asyncpg.Connection, window: list[Piece], start: datetime, end: datetime
) -> list[VehicleWindow]:
    """Every vehicle with readings in [start, end), of its own or of a meter linked to it."""
    records = await read(conn, _window_sql(window, one_vehicle=False), *_args(window, start, end))
    vehicles = _vehicles(records)
    return [v for v in vehicles if v.vehicle_readings or any(m.readings for m in v.meters)]
