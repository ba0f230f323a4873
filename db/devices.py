"""Silent devices: those whose newest reading is older than a span, read from the latest-state
tables (one row per device, its newest reading).

The latest tables have no index on `ts`, on purpose: every flush updates `ts`, and an index
on it would end their HOT updates (a write cost paid on every reading, for a read an operator
makes now and then). A scan of one row per device is cheap: 40,000 devices in a few
milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from db.tables import METER, SESSIONS, STREAMS, VEHICLE

# Both streams or one ($1, $2), silent for longer than $3 seconds, longest silent first;
# the page ($7 rows) after a key (last reading, stream, id: $4, $5, $6; none for the first
# page), and the listing's
# count; a silent meter with the vehicle charging on it (one open session a meter at most). A
# row always comes back: with the count alone when the page is empty.
SILENT_PAGE = f"""
WITH silent AS (
    SELECT 'meter' AS stream, {METER.id_column} AS device_id, ts, received_at
    FROM {METER.latest} WHERE $1::bool AND ts < now() - make_interval(secs => $3)
    UNION ALL
    SELECT 'vehicle', {VEHICLE.id_column}, ts, received_at
    FROM {VEHICLE.latest} WHERE $2::bool AND ts < now() - make_interval(secs => $3)
),
page AS (
    SELECT * FROM silent
    WHERE $4::timestamptz IS NULL
       OR (ts, stream, device_id COLLATE "C") > ($4, $5::text, $6::text COLLATE "C")
    ORDER BY ts, stream, device_id COLLATE "C" LIMIT $7
)
SELECT now() AS at, t.total, p.stream, p.device_id, p.ts, p.received_at, s.vehicle_id
FROM (SELECT count(*) AS total FROM silent) t LEFT JOIN page p ON true
LEFT JOIN {SESSIONS} s
    ON p.stream = 'meter' AND s.meter_id = p.device_id AND s.ended_at IS NULL
ORDER BY p.ts, p.stream, p.device_id COLLATE "C\""""

# For /metrics and the overview: devices with a stored reading, and of them the silent ones.
CENSUS = " UNION ALL ".join(
    f"""SELECT '{t.stream}' AS stream, count(*) AS devices,
       count(*) FILTER (WHERE ts < now() - make_interval(secs => $1)) AS silent
FROM {t.latest}"""
    for t in STREAMS.values()
)

# For each vehicle of `rows` (an SQL relation with a vehicle_id), the meters of its open
# sessions that have gone silent for `span` seconds (a parameter): its AC is not whole. One
# row per such vehicle, its meters in byte order; the analytics statements join it.
SILENT_METERS = f"""
    SELECT s.vehicle_id, array_agg(s.meter_id ORDER BY s.meter_id COLLATE "C") AS silent_ids,
           array_agg(l.ts ORDER BY s.meter_id COLLATE "C") AS silent_ts
    FROM {SESSIONS} s JOIN {METER.latest} l USING (meter_id)
    WHERE s.vehicle_id IN (SELECT vehicle_id FROM {{rows}}) AND s.ended_at IS NULL
      AND l.ts < now() - make_interval(secs => {{span}}::float8)
    GROUP BY s.vehicle_id"""

SilentKey = tuple[datetime, str, str]


@dataclass(frozen=True, slots=True)
class SilentDevice:
    stream: str
    device_id: str
    last_reading_at: datetime
    received_at: datetime
    vehicle_id: str | None  # a meter's: the vehicle charging on it now

    @property
    def key(self) -> SilentKey:
        return (self.last_reading_at, self.stream, self.device_id)


@dataclass(frozen=True, slots=True)
class SilentPage:
    at: datetime  # the database's now(), which the span was counted back from
    total: int  # silent devices over every page
    devices: list[SilentDevice]
    more: bool


async def silent_page(
    conn: asyncpg.Connection,
    *,
    streams: tuple[str, ...],
    silent_for_s: float,
    after: SilentKey | None,
    limit: int,
) -> SilentPage:
    """One page of the devices silent for longer than `silent_for_s`, longest first."""
    after_ts, after_stream, after_id = after or (None, "", "")
    records = await conn.fetch(
        SILENT_PAGE,
        "meter" in streams,
        "vehicle" in streams,
        silent_for_s,
        after_ts,
        after_stream,
        after_id,
        limit + 1,
    )
    devices = [
        SilentDevice(r["stream"], r["device_id"], r["ts"], r["received_at"], r["vehicle_id"])
        for r in records
        if r["stream"] is not None
    ]
    return SilentPage(
        at=records[0]["at"],
        total=records[0]["total"],
        devices=devices[:limit],
        more=len(devices) > limit,
    )


async def census(conn: asyncpg.Connection, silent_after_s: float) -> dict[str, tuple[int, int]]:
    """Per stream: (devices with a stored reading, silent ones among them)."""
    return {
        r["stream"]: (r["devices"], r["silent"]) for r in await conn.fetch(CENSUS, silent_after_s)
    }
