"""Charging efficiency over a window (SPEC §5, §6): one vehicle, the whole fleet, and a
vehicle's series of buckets for charts.

DC is what a vehicle reported in the window. AC is what its meters measured while each was
linked to it: every session overlapping the window contributes its meter's readings between
max(session start, window start) and min(session end, window end), half-open.

Sums come from the hourly roll-ups for whole hours (with the deltas not yet folded into
them, `db.rollup`) and from the raw readings for the parts of hours at the window's edges
(db/windows.py decides which). Sessions that cover the whole
window share the window's pieces; one that starts or ends inside it is summed over its own
hours and edges. One vehicle and the fleet run the same statement (the vehicle's names it),
so their numbers agree; the cost depends on the window and the fleet's size, not on how much
history is stored.

PostgreSQL also gathers each vehicle's figures, orders the fleet (worst efficiency first),
filters it and cuts the page after the cursor's key: the daemon's work for a page is in
proportion to the page, not to the fleet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg

from db.devices import SILENT_METERS
from db.pool import ReadConnection, read_settings
from db.tables import METER, SESSIONS, VEHICLE
from db.windows import HOURLY, RAW, Piece

# A reading over this many kWh cannot be stored any more (MAX_KWH_PER_READING), but rows
# stored before that bound existed can hold up to 1.8e308, and summing two overflows float8
# (22003): each is read as at most this much, so a window's sum always fits.
CLAMP = "1e300"

# Sessions overlapping the window [$1, $2): as the exclusion constraints' GiST indexes on
# (vehicle or meter, tstzrange(started_at, ended_at)) serve it, in time proportional to the
# sessions of the window however many a vehicle had before.
OVERLAPS = "tstzrange({alias}started_at, {alias}ended_at) && tstzrange($1, $2)"

# Window start and end are $1 and $2, where the raw history kept begins $3; each piece's
# bounds follow ($4, $5, ...); the vehicle, for one vehicle's figures, comes last.
FIRST_PIECE_PARAM = 4
# No raw history dropped yet (a caller that does not say): every reading is there.
NO_LIMIT = datetime(1, 1, 1, tzinfo=UTC)


async def read(
    conn: asyncpg.Connection, sql: str, *args: Any, plan: str | None = None
) -> list[asyncpg.Record]:
    """An analytics statement, with what operators' reads run with (`db.pool.read_settings`:
    the statement timeout, no JIT, generic plans; `plan` overrides the plan cache mode).

    A read pool's connections carry those settings in their session: one round trip. Through
    a transaction pooler there is no session to keep them in (nor on a connection of another
    kind): the statement runs in a read-only transaction of its own that sets them (SET LOCAL
    ends with it), three round trips more."""
    in_session = isinstance(conn, ReadConnection) and conn.in_session
    if in_session and plan is None:
        return cast(list[asyncpg.Record], await conn.fetch(sql, *args))
    settings = conn.settings if isinstance(conn, ReadConnection) else read_settings(None)
    if in_session:
        settings = {}
    if plan is not None:
        settings = {**settings, "plan_cache_mode": plan}
    async with conn.transaction(readonly=True):
        await conn.execute("; ".join(f"SET LOCAL {k} = '{v}'" for k, v in settings.items()))
        return cast(list[asyncpg.Record], await conn.fetch(sql, *args))


def ceil_hour_sql(column: str) -> str:
    """SQL for the first whole hour at or after `column` (UTC)."""
    floor = f"date_trunc('hour', {column}, 'UTC')"
    return f"{floor} + CASE WHEN {floor} < {column} THEN interval '1 hour' ELSE interval '0' END"


def snapped_sql(column: str) -> str:
    """A session's bound (clipped to the window) as it can be read: itself from the raw
    history's start ($3) on; before it, the next whole hour. So each hour of a meter before
    the raw history goes to the session that holds the hour's start, never to two."""
    return f"CASE WHEN {column} < $3 THEN {ceil_hour_sql(column)} ELSE {column} END"


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
    dc_parts, ac_parts = _piece_sums(window, vehicle_param if one_vehicle else None)
    return f"""
dc AS (
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
    SELECT s.vehicle_id, s.meter_id, {snapped_sql("greatest(s.started_at, $1)")} AS a,
           {snapped_sql("least(coalesce(s.ended_at, 'infinity'), $2)")} AS b,
           s.started_at <= $1 AND (s.ended_at IS NULL OR s.ended_at >= $2) AS whole
    FROM {SESSIONS} s
    WHERE {OVERLAPS.format(alias="s.")} {vehicle.format(alias="s")}
),
edges AS (
    SELECT vehicle_id, meter_id, a, b, {ceil_hour_sql("a")} AS ha,
           date_trunc('hour', b, 'UTC') AS hb
    FROM iv WHERE NOT whole
),
partial AS (
    SELECT vehicle_id, meter_id, sum(kwh) AS kwh, sum(n)::bigint AS n FROM (
        SELECT e.vehicle_id, e.meter_id, least(h.kwh_consumed_ac, {CLAMP}) AS kwh, h.readings AS n
        FROM edges e JOIN {METER.hourly_all} h
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
),
{FIGURES}"""


def _piece_sums(window: list[Piece], vehicle_param: str | None) -> tuple[str, str]:
    """The window's pieces, each summed from the roll-ups or the raw history: DC by vehicle,
    AC by meter (for one vehicle: its own, and the meters it was linked to in the window)."""
    vehicle = f"AND {{alias}}.vehicle_id = {vehicle_param}" if vehicle_param else ""
    overlapping = OVERLAPS.format(alias="")
    its_meters = (
        f"SELECT meter_id FROM {SESSIONS} WHERE vehicle_id = {vehicle_param} AND {overlapping}"
    )
    meter = f"AND {{alias}}.meter_id IN ({its_meters})" if vehicle_param else ""
    h_vehicle, v_vehicle = vehicle.format(alias="h"), vehicle.format(alias="v")
    h_meter, m_meter = meter.format(alias="h"), meter.format(alias="m")
    dc_parts = _parts(
        window,
        {
            HOURLY: f"""
        SELECT h.vehicle_id, {{sign}} * least(h.kwh_delivered_dc, {CLAMP}), {{sign}} * h.readings,
               {{sign}} * h.battery_temp_sum
        FROM {VEHICLE.hourly_all} h WHERE h.hour >= {{lo}} AND h.hour < {{hi}} {h_vehicle}""",
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
        FROM {METER.hourly_all} h WHERE h.hour >= {{lo}} AND h.hour < {{hi}} {h_meter}""",
            RAW: f"""
        SELECT m.meter_id, {{sign}} * least(m.kwh_consumed_ac, {CLAMP}), {{sign}}, 0
        FROM {METER.history} m WHERE m.ts >= {{lo}} AND m.ts < {{hi}} {m_meter}""",
        },
    )
    return dc_parts, ac_parts


# One row per vehicle: its DC figures and the AC of its meters, a meter once however many of
# its sessions the window holds. An hour's roll-up minus the readings outside the window can
# leave a float's last bit where no reading is: with no reading, no energy. (Each vehicle's
# meters, as arrays, are gathered for the rows that come back only: `METERS`.)
FIGURES = """per_meter AS (
    SELECT vehicle_id, meter_id, sum(CASE WHEN n > 0 THEN kwh ELSE 0 END) AS kwh,
           sum(n)::bigint AS n
    FROM ac GROUP BY vehicle_id, meter_id
),
ac_total AS (
    SELECT vehicle_id, sum(kwh) AS kwh, sum(n)::bigint AS n FROM per_meter GROUP BY vehicle_id
),
figures AS (
    SELECT coalesce(dc.vehicle_id, a.vehicle_id) AS vehicle_id,
           CASE WHEN dc.n > 0 THEN dc.kwh ELSE 0 END AS dc_kwh,
           coalesce(dc.n, 0) AS vehicle_readings,
           CASE WHEN dc.n > 0 THEN dc.temp END AS battery_temp_sum,
           coalesce(a.kwh, 0) AS ac_kwh, coalesce(a.n, 0) AS meter_readings
    FROM dc FULL JOIN ac_total a USING (vehicle_id)
)"""

# The meters of the vehicles of `{rows}` (a CTE with a vehicle_id column), in id order.
METERS = """
    SELECT m.vehicle_id, array_agg(m.meter_id ORDER BY m.meter_id COLLATE "C") AS meter_ids,
           array_agg(m.kwh ORDER BY m.meter_id COLLATE "C") AS meter_kwh,
           array_agg(m.n ORDER BY m.meter_id COLLATE "C") AS meter_counts
    FROM per_meter m JOIN {rows} r USING (vehicle_id) GROUP BY m.vehicle_id"""

KNOWN = f"""EXISTS (SELECT 1 FROM {VEHICLE.latest} WHERE vehicle_id = {{vehicle}})
    OR EXISTS (SELECT 1 FROM {SESSIONS} WHERE vehicle_id = {{vehicle}})"""
VEHICLE_KNOWN = f"SELECT {KNOWN.format(vehicle='$1')}"


async def vehicle_known(conn: asyncpg.Connection, vehicle_id: str) -> bool:
    """Has the vehicle reported, or been linked to a meter?"""
    return bool(await conn.fetchval(VEHICLE_KNOWN, vehicle_id))


def vehicle_sql(window: list[Piece]) -> str:
    """One vehicle's figures, whether it is known at all, and the silent meters it charges
    on, in one statement: one row. Parameters after the pieces: the vehicle, the span after
    which a meter is silent (seconds)."""
    n = FIRST_PIECE_PARAM + 2 * len(window)
    vehicle, span = f"${n}", f"${n + 1}"
    asked = f"(SELECT {vehicle}::text AS vehicle_id) asked"
    return f"""
WITH {_window_sql(window, one_vehicle=True)},
meters AS ({METERS.format(rows="figures")}),
silent AS ({SILENT_METERS.format(rows=asked, span=span)})
SELECT {KNOWN.format(vehicle=vehicle)} AS known, f.*, meters.meter_ids, meters.meter_kwh,
       meters.meter_counts, silent.silent_ids, silent.silent_ts
FROM (SELECT 1) one LEFT JOIN figures f ON true LEFT JOIN meters USING (vehicle_id)
LEFT JOIN silent ON true"""


def fleet_sql(window: list[Piece]) -> str:
    """A page of the fleet, worst efficiency first (no AC last, then by id, byte order), cut
    after a key in PostgreSQL; and the fleet's count. Parameters after the pieces: alert
    only, the threshold, the key to start after (group, ratio, id), the page's size, the span
    after which a meter is silent (seconds). A row always comes back: with the count alone
    when the page is empty."""
    n = FIRST_PIECE_PARAM + 2 * len(window)
    alert, threshold, group, ratio, after, limit, span = (f"${n + i}" for i in range(7))
    return f"""
WITH {_window_sql(window, one_vehicle=False)},
ranked AS (
    SELECT f.*, CASE WHEN ac_kwh > 0 THEN 0 ELSE 1 END AS rank_group,
           CASE WHEN ac_kwh > 0 THEN dc_kwh / ac_kwh ELSE 0 END AS rank_ratio,
           vehicle_id COLLATE "C" AS rank_id
    FROM figures f WHERE vehicle_readings > 0 OR meter_readings > 0
),
listed AS (
    SELECT * FROM ranked
    WHERE NOT {alert}::bool OR (rank_group = 0 AND rank_ratio < {threshold}::float8)
),
page AS (
    SELECT * FROM listed
    WHERE (rank_group, rank_ratio, rank_id)
        > ({group}::int, {ratio}::float8, {after}::text COLLATE "C")
    ORDER BY rank_group, rank_ratio, rank_id LIMIT {limit}
),
meters AS ({METERS.format(rows="page")}),
silent AS ({SILENT_METERS.format(rows="page", span=span)})
SELECT t.total, p.vehicle_id, p.dc_kwh, p.vehicle_readings, p.battery_temp_sum, p.ac_kwh,
       p.meter_readings, m.meter_ids, m.meter_kwh, m.meter_counts,
       p.rank_group, p.rank_ratio, p.rank_id, s.silent_ids, s.silent_ts
FROM (SELECT count(*) AS total FROM listed) t
LEFT JOIN (page p LEFT JOIN meters m USING (vehicle_id) LEFT JOIN silent s USING (vehicle_id))
  ON true
ORDER BY p.rank_group, p.rank_ratio, p.rank_id"""


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
    ac_kwh: float
    meters: list[MeterTotal]
    # The meters of its open sessions that have gone silent, with their last reading.
    silent_meters: list[tuple[str, datetime]] = field(default_factory=list)

    @property
    def avg_battery_temp(self) -> float | None:
        if not self.vehicle_readings or self.battery_temp_sum is None:
            return None
        return self.battery_temp_sum / self.vehicle_readings

    @property
    def meter_readings(self) -> int:
        return sum(m.readings for m in self.meters)


# (A fleet's page is turned into figures row by row: columns by position.)
_ID, _DC, _DC_N, _TEMP, _AC, _, _METER_IDS, _METER_KWH, _METER_N = range(9)


def silent_of(record: asyncpg.Record) -> list[tuple[str, datetime]]:
    """The silent meters of a row of the vehicle's or the fleet's statement."""
    return list(zip(record["silent_ids"] or (), record["silent_ts"] or (), strict=True))


def vehicle_of(record: asyncpg.Record, offset: int = 0) -> VehicleWindow:
    """A row of `figures` (its columns from `offset` on) as a vehicle's totals, with its
    silent meters."""
    ids = record[offset + _METER_IDS] or ()
    meters = [
        MeterTotal(meter_id, int(n), float(kwh))
        for meter_id, kwh, n in zip(
            ids, record[offset + _METER_KWH] or (), record[offset + _METER_N] or (), strict=True
        )
    ]
    return VehicleWindow(
        record[offset + _ID],
        float(record[offset + _DC]),
        int(record[offset + _DC_N]),
        record[offset + _TEMP],
        float(record[offset + _AC]),
        meters,
        silent_of(record),
    )


def _args(
    window: list[Piece], start: datetime, end: datetime, raw_from: datetime | None = None
) -> list[Any]:
    bounds = (bound for p in window for bound in (p.lo, p.hi))
    return [start, end, raw_from or NO_LIMIT, *bounds]


async def vehicle_window(
    conn: asyncpg.Connection,
    vehicle_id: str,
    window: list[Piece],
    start: datetime,
    end: datetime,
    raw_from: datetime | None = None,
    *,
    silent_after_s: float,
) -> VehicleWindow | None:
    """The vehicle's totals over [start, end), or None for a vehicle never seen. Before
    `raw_from`, the window and the pieces must be `db.windows.rounded` (whole hours)."""
    sql = vehicle_sql(window)
    args = _args(window, start, end, raw_from)
    (record,) = await read(conn, sql, *args, vehicle_id, silent_after_s)
    if not record["known"]:
        return None
    if record["vehicle_id"] is None:
        return VehicleWindow(vehicle_id, 0.0, 0, None, 0.0, [], silent_of(record))
    return vehicle_of(record, offset=1)


SortKey = tuple[int, float, str]
FIRST_KEY: SortKey = (-1, 0.0, "")


@dataclass(frozen=True, slots=True)
class FleetPage:
    total: int  # vehicles listed, over every page
    rows: list[asyncpg.Record]  # `figures` columns from FLEET_OFFSET on, then the sort key
    more: bool  # rows beyond this page

    def key(self, record: asyncpg.Record) -> SortKey:
        return (record["rank_group"], record["rank_ratio"], record["rank_id"])


FLEET_OFFSET = 1  # (the count comes first)


async def fleet_page(
    conn: asyncpg.Connection,
    window: list[Piece],
    start: datetime,
    end: datetime,
    *,
    alert_below: float | None,
    after: SortKey,
    limit: int,
    raw_from: datetime | None = None,
    silent_after_s: float,
) -> FleetPage:
    """The vehicles with readings in [start, end), of their own or of a meter linked to them,
    worst first, after `after`: at most `limit`. With `alert_below`, only those under it."""
    sql = fleet_sql(window)
    alert = alert_below is not None
    args = [*_args(window, start, end, raw_from), alert, alert_below or 0.0, *after, limit + 1]
    args.append(silent_after_s)
    # PostgreSQL's own choice of plan: the fleet's statement is planned in a millisecond of
    # hundreds, and its best plan (parallel or not) depends on the window's size.
    records = await read(conn, sql, *args, plan="auto")
    total = int(records[0]["total"])
    rows = [r for r in records if r["vehicle_id"] is not None]
    return FleetPage(total, rows[:limit], len(rows) > limit)
