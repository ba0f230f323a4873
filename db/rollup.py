"""The hourly roll-ups: folded from the deltas the flushes append, and rebuilt from the
history over a span of hours.

**Fold.** Each flush appends what it stored, by device and hour, to `*_hour_deltas` (a plain
append: the flush pays for no lookup, lock or update of a roll-up). `fold` moves the deltas
into the roll-ups: one statement deletes a batch of them and adds their sums to their hours,
so each delta is counted in the roll-ups or in the deltas, never in both and never in
neither, whatever a reader's snapshot. Readers read both (`*_hourly_all`). One folder at a
time per schema (an advisory lock; another daemon's fold is skipped, not waited for).

**Rebuild**, for readings written to the history by other means than the daemon's flush (a
bulk import, the benchmarks' fleet loaded with SQL). A rebuild replaces the hours it covers
(their roll-ups and deltas): it must not run while the daemon writes readings of the same
devices for those hours (their increments would be replaced too). Name the devices to
rebuild only theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from db.analytics import CLAMP
from db.migrate import lock_key
from db.tables import METER, VEHICLE, StreamTables
from db.windows import ceil_hour, floor_hour

FOLD_BATCH = 100_000  # deltas moved by one statement

_ROLLUP_VALUES = {
    "meter": ("kwh_consumed_ac", "readings"),
    "vehicle": ("kwh_delivered_dc", "readings", "battery_temp_sum", "last_ts", "last_soc"),
}
# $1: the first hour still kept (older deltas are dropped: their partitions are gone),
# $2: how many deltas to move. Returns how many were moved.
_FOLD_SUMS = {
    "meter": """
        SELECT meter_id, hour, sum(kwh_consumed_ac), sum(readings)
        FROM moved WHERE hour >= $1 GROUP BY 1, 2 ORDER BY 1, 2""",
    "vehicle": """
        SELECT vehicle_id, hour, sum(kwh_delivered_dc), sum(readings), sum(battery_temp_sum),
               max(last_ts), (array_agg(last_soc ORDER BY last_ts DESC))[1]
        FROM moved WHERE hour >= $1 GROUP BY 1, 2 ORDER BY 1, 2""",
}
_FOLD_SET = {
    "meter": """kwh_consumed_ac = h.kwh_consumed_ac + EXCLUDED.kwh_consumed_ac,
        readings = h.readings + EXCLUDED.readings""",
    "vehicle": """kwh_delivered_dc = h.kwh_delivered_dc + EXCLUDED.kwh_delivered_dc,
        readings = h.readings + EXCLUDED.readings,
        battery_temp_sum = h.battery_temp_sum + EXCLUDED.battery_temp_sum,
        last_soc = CASE WHEN EXCLUDED.last_ts > h.last_ts THEN EXCLUDED.last_soc
                        ELSE h.last_soc END,
        last_ts = greatest(h.last_ts, EXCLUDED.last_ts)""",
}


def _fold_sql(t: StreamTables) -> str:
    columns = ", ".join((t.id_column, "hour", *_ROLLUP_VALUES[t.stream]))
    return f"""
WITH moved AS (
    DELETE FROM {t.deltas}
    WHERE ctid = ANY (ARRAY(SELECT ctid FROM {t.deltas} LIMIT $2))
    RETURNING *
), folded AS (
    INSERT INTO {t.hourly} AS h ({columns}){_FOLD_SUMS[t.stream]}
    ON CONFLICT ({t.id_column}, hour) DO UPDATE
    SET {_FOLD_SET[t.stream]}
)
SELECT count(*) FROM moved"""


FOLD_SQL = {t.stream: _fold_sql(t) for t in (METER, VEHICLE)}


async def fold(
    conn: asyncpg.Connection, *, schema: str, oldest_hour: datetime, batch: int = FOLD_BATCH
) -> int | None:
    """Move up to `batch` deltas of each stream into the roll-ups, in one transaction; how
    many moved, or None when another daemon is folding."""
    async with conn.transaction():
        mine = await conn.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtext($1))", lock_key(schema, "fold")
        )
        if not mine:
            return None
        moved = 0
        for sql in FOLD_SQL.values():
            moved += await conn.fetchval(sql, oldest_hour, batch)
        return moved


_DEVICES = "AND ($3::text[] IS NULL OR {column} = ANY($3))"

REBUILD_METERS = (
    f"""
DELETE FROM {METER.deltas} WHERE hour >= $1 AND hour < $2 {_DEVICES.format(column="meter_id")}""",
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
DELETE FROM {VEHICLE.deltas}
WHERE hour >= $1 AND hour < $2 {_DEVICES.format(column="vehicle_id")}""",
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
