"""Reads for the operator routes: latest state (hot store) and recent rejections."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from db.tables import REJECTIONS, STREAMS

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
