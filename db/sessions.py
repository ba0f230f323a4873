"""Charging sessions (SPEC §5): which meter a vehicle charges on, and since when.

Linking a vehicle to a meter ends its open session, and any other vehicle's open session on
that meter (a meter charges one vehicle at a time: the car before has left), and opens the
new one at the same instant, in one transaction. Ending a session ("the car left") ends it
now. Links are serialised (one transaction-level advisory lock: a link takes a millisecond,
and cars plug in a few times a second across a fleet), so a vehicle never has two open
sessions, a meter never two, and neither's sessions overlap: the table's constraints say so
too, and one kWh of a meter is never counted for two vehicles.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from db.migrate import lock_key
from db.tables import SESSIONS

OPEN_SESSION = f"""
SELECT vehicle_id, meter_id, started_at, ended_at FROM {SESSIONS}
WHERE vehicle_id = $1 AND ended_at IS NULL"""

OPEN_ON_METER = f"""
SELECT vehicle_id, meter_id, started_at, ended_at FROM {SESSIONS}
WHERE meter_id = $1 AND ended_at IS NULL"""

# The new session starts when the old ones end: never at or before an old start.
LINK_INSTANT = """
SELECT greatest(clock_timestamp(), $1::timestamptz + interval '1 microsecond',
                $2::timestamptz + interval '1 microsecond')"""

END_SESSION = f"""
UPDATE {SESSIONS} SET ended_at = $2
WHERE vehicle_id = $1 AND ended_at IS NULL
RETURNING vehicle_id, meter_id, started_at, ended_at"""

START_SESSION = f"""
INSERT INTO {SESSIONS} (vehicle_id, meter_id, started_at) VALUES ($1, $2, $3)
RETURNING vehicle_id, meter_id, started_at, ended_at"""


@dataclass(frozen=True, slots=True)
class SessionRow:
    vehicle_id: str
    meter_id: str
    started_at: datetime
    ended_at: datetime | None


@dataclass(frozen=True, slots=True)
class Link:
    changed: bool
    session: SessionRow
    previous: SessionRow | None  # the vehicle's session this link ended
    displaced: SessionRow | None = None  # another vehicle's session on the meter, ended


def _row(record: asyncpg.Record) -> SessionRow:
    return SessionRow(
        record["vehicle_id"], record["meter_id"], record["started_at"], record["ended_at"]
    )


async def _serialised(conn: asyncpg.Connection, schema: str) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock_key(schema, "links"))


async def link(conn: asyncpg.Connection, *, schema: str, vehicle_id: str, meter_id: str) -> Link:
    async with conn.transaction():
        await _serialised(conn, schema)
        current = await conn.fetchrow(OPEN_SESSION, vehicle_id)
        if current is not None and current["meter_id"] == meter_id:
            return Link(changed=False, session=_row(current), previous=None)
        occupant = await conn.fetchrow(OPEN_ON_METER, meter_id)
        # greatest() ignores NULL: with no open session this is just clock_timestamp().
        instant = await conn.fetchval(
            LINK_INSTANT,
            current["started_at"] if current is not None else None,
            occupant["started_at"] if occupant is not None else None,
        )
        previous = displaced = None
        if current is not None:
            previous = _row(await conn.fetchrow(END_SESSION, vehicle_id, instant))
        if occupant is not None:
            displaced = _row(await conn.fetchrow(END_SESSION, occupant["vehicle_id"], instant))
        started = _row(await conn.fetchrow(START_SESSION, vehicle_id, meter_id, instant))
        return Link(changed=True, session=started, previous=previous, displaced=displaced)


async def unlink(conn: asyncpg.Connection, *, schema: str, vehicle_id: str) -> SessionRow | None:
    """End the vehicle's open session now (the car left its charger); None if it has none."""
    async with conn.transaction():
        await _serialised(conn, schema)
        current = await conn.fetchrow(OPEN_SESSION, vehicle_id)
        if current is None:
            return None
        instant = await conn.fetchval(LINK_INSTANT, current["started_at"], None)
        return _row(await conn.fetchrow(END_SESSION, vehicle_id, instant))


# One statement per device column: one with `($1 IS NULL OR …)` could not be served from an
# index by a generic plan (which operators' reads run on).
SESSIONS_OF = {
    column: f"""
SELECT vehicle_id, meter_id, started_at, ended_at FROM {SESSIONS}
WHERE {column} = $1 AND ($2::timestamptz IS NULL OR started_at < $2)
ORDER BY started_at DESC
LIMIT $3"""
    for column in ("vehicle_id", "meter_id")
}


async def sessions_of(
    conn: asyncpg.Connection,
    *,
    vehicle_id: str | None,
    meter_id: str | None,
    started_before: datetime | None,
    limit: int,
) -> list[SessionRow]:
    """A vehicle's (or a meter's) sessions, the newest first."""
    column, device = (
        ("vehicle_id", vehicle_id) if vehicle_id is not None else ("meter_id", meter_id)
    )
    records = await conn.fetch(SESSIONS_OF[column], device, started_before, limit)
    return [_row(r) for r in records]
