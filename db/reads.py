"""Reads for the operator routes: latest state (hot store), recent rejections, and the
fleet's counts for the dashboard."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from db.tables import METER, REJECTIONS, STREAMS, VEHICLE

_LATEST_SQL = {
    name: f"SELECT {', '.join(t.columns)} FROM {t.latest} WHERE {t.id_column} = $1"
    for name, t in STREAMS.items()
}

RECENT_REJECTIONS = f"""
SELECT id, received_at, source, topic_or_route, payload, reason
FROM {REJECTIONS}
WHERE ($1::text IS NULL OR source = $1) AND ($2::bigint IS NULL OR id < $2)
ORDER BY id DESC
LIMIT $3"""


# Devices whose newest reading arrived lately and devices silent (`db.devices`), counted in
# one scan of each hot table (they have no index on received_at or ts, on purpose: it would
# end their HOT updates; a scan of one row per device is cheap), and the rejections of the
# last hour, counted up to a bound.
_LATEST_COUNTS = """(SELECT count(*) FILTER (WHERE received_at > now() - make_interval(secs => $1))
            AS seen,
        count(*) FILTER (WHERE ts < now() - make_interval(secs => $4)) AS silent
     FROM {latest})"""
OVERVIEW = f"""
SELECT now() AS at, m.seen AS meters, v.seen AS vehicles,
    (SELECT count(*) FROM (
        SELECT FROM {REJECTIONS} WHERE received_at > now() - make_interval(secs => $2) LIMIT $3
     ) recent) AS rejections,
    m.silent AS silent_meters, v.silent AS silent_vehicles
FROM {_LATEST_COUNTS.format(latest=METER.latest)} m,
     {_LATEST_COUNTS.format(latest=VEHICLE.latest)} v"""


async def overview(
    conn: asyncpg.Connection,
    *,
    seen_s: float,
    rejections_s: float,
    rejections_max: int,
    silent_s: float,
) -> dict[str, Any]:
    return dict(await conn.fetchrow(OVERVIEW, seen_s, rejections_s, rejections_max, silent_s))


async def latest_state(
    conn: asyncpg.Connection, stream: str, device_id: str
) -> dict[str, Any] | None:
    record = await conn.fetchrow(_LATEST_SQL[stream], device_id)
    return dict(record) if record is not None else None


async def recent_rejections(
    conn: asyncpg.Connection, *, source: str | None, before_id: int | None, limit: int
) -> list[dict[str, Any]]:
    records = await conn.fetch(RECENT_REJECTIONS, source, before_id, limit)
    return [dict(r) for r in records]


async def server_time(conn: asyncpg.Connection) -> datetime:
    value: datetime = await conn.fetchval("SELECT now()")
    return value
