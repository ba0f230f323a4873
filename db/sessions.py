"""Charging sessions (SPEC §5): which meter a vehicle charges on, and since when.

Linking a vehicle to a meter ends its open session and opens the new one at the same
instant, in one transaction serialised per vehicle, so a vehicle never has two open
sessions and its sessions never overlap (the table's constraints say so too).
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

# The new session starts when the old one ends; never at or before the old start.
LINK_INSTANT = "SELECT greatest(clock_timestamp(), $1::timestamptz + interval '1 microsecond')"

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
    previous: SessionRow | None


def _row(record: asyncpg.Record) -> SessionRow:
    return SessionRow(
        record["vehicle_id"], record["meter_id"], record["started_at"], record["ended_at"]
    )


async def link(conn: asyncpg.Connection, *, schema: str, vehicle_id: str, meter_id: str) -> Link:
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", lock_key(schema, f"link:{vehicle_id}")
        )
        current = await conn.fetchrow(OPEN_SESSION, vehicle_id)
        if current is not None and current["meter_id"] == meter_id:
            return Link(changed=False, session=_row(current), previous=None)
        # greatest() ignores NULL: with no open session this is just clock_timestamp().
        instant = await conn.fetchval(
            LINK_INSTANT, current["started_at"] if current is not None else None
        )
        previous = None
        if current is not None:
            previous = _row(await conn.fetchrow(END_SESSION, vehicle_id, instant))
        started = _row(await conn.fetchrow(START_SESSION, vehicle_id, meter_id, instant))
        return Link(changed=True, session=started, previous=previous)


SESSIONS_OF = f"""
SELECT vehicle_id, meter_id, started_at, ended_at FROM {SESSIONS}
WHERE ($1::text IS NULL OR vehicle_id = $1) AND ($2::text IS NULL OR meter_id = $2)
  AND ($3::timestamptz IS NULL OR started_at < $3)
ORDER BY started_at DESC
LIMIT $4"""


async def sessions_of(
    conn: asyncpg.Connection,
    *,
    vehicle_id: str | None,
    meter_id: str | None,
    started_before: datetime | None,
    limit: int,
) -> list[SessionRow]:
    """A vehicle's (or a meter's) sessions, the newest first."""
    records = await conn.fetch(SESSIONS_OF, vehicle_id, meter_id, started_before, limit)
    return [_row(r) for r in records]
