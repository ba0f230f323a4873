"""The flush transaction: a whole batch of readings and rejections in one round of SQL.

One statement per stream inserts the history rows (duplicates of (device, ts) are skipped,
not errors) and upserts the latest row per device, guarded so that an older reading never
overwrites a newer state. Arrays travel through `unnest`, never a statement per reading; the
latest rows are written in device-id order so that two daemons cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from db.tables import REJECTIONS, STREAMS, StreamTables


def _flush_sql(t: StreamTables) -> str:
    cols = ", ".join(t.columns)
    params = ", ".join(f"${n}::{typ}[]" for n, typ in enumerate(t.types, start=1))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in t.columns[1:])
    # Only the count comes back when every row was new (the common case); the keys stored
    # come back too when some were already there, so that duplicates can be told apart.
    return f"""
WITH batch AS (
    SELECT * FROM unnest({params}) AS b({cols})
), inserted AS (
    INSERT INTO {t.history} ({cols})
    SELECT {cols} FROM batch
    ON CONFLICT ({t.id_column}, ts) DO NOTHING
    RETURNING {t.id_column}, ts
), latest AS (
    INSERT INTO {t.latest} AS l ({cols})
    SELECT DISTINCT ON ({t.id_column}) {cols} FROM batch ORDER BY {t.id_column}, ts DESC
    ON CONFLICT ({t.id_column}) DO UPDATE SET {updates}
    WHERE l.ts < EXCLUDED.ts
)
SELECT count(*) AS stored,
       CASE WHEN count(*) < cardinality($1::text[]) THEN array_agg({t.id_column}) END AS ids,
       CASE WHEN count(*) < cardinality($1::text[]) THEN array_agg(ts) END AS tss
FROM inserted"""


FLUSH_SQL = {name: _flush_sql(t) for name, t in STREAMS.items()}

INSERT_REJECTIONS = f"""
INSERT INTO {REJECTIONS} (received_at, source, topic_or_route, payload, reason)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[])"""

Row = tuple[Any, ...]
Key = tuple[str, datetime]


def truncate_payload(payload: bytes, max_bytes: int) -> str:
    """The payload kept with a rejection: at most `max_bytes`, marked when cut."""
    text = payload[:max_bytes].decode("utf-8", errors="replace")
    return text + ("…" if len(payload) > max_bytes else "")


@dataclass(slots=True)
class RejectionRow:
    received_at: datetime
    source: str
    topic_or_route: str
    payload: str
    reason: str


@dataclass(frozen=True, slots=True)
class Stored:
    """What one stream's insert stored: `count` rows, and which ones when that is fewer than
    were offered (`keys` is None when every offered row was new)."""

    count: int
    keys: set[Key] | None = None

    def is_new(self, key: Key) -> bool:
        """Whether `key` was stored now; a second copy of it in the same batch is not."""
        if self.keys is None:
            return True
        if key in self.keys:
            self.keys.discard(key)
            return True
        return False


@dataclass(slots=True)
class FlushBatch:
    """Rows for one transaction; each row in the column order of `StreamTables.columns`."""

    rows: dict[str, list[Row]] = field(default_factory=lambda: {name: [] for name in STREAMS})
    rejections: list[RejectionRow] = field(default_factory=list)


async def flush_batch(conn: asyncpg.Connection, batch: FlushBatch) -> dict[str, Stored]:
    """Write the batch in one transaction; returns what each stream stored."""
    inserted: dict[str, Stored] = {}
    async with conn.transaction():
        for stream, rows in batch.rows.items():
            if rows:
                inserted[stream] = await _insert_stream(conn, stream, rows)
        if batch.rejections:
            await conn.execute(INSERT_REJECTIONS, *_columns_of_rejections(batch.rejections))
    return inserted


async def _insert_stream(conn: asyncpg.Connection, stream: str, rows: Sequence[Row]) -> Stored:
    columns = list(zip(*rows, strict=True))
    count, ids, tss = await conn.fetchrow(FLUSH_SQL[stream], *columns)
    if count == len(rows):
        return Stored(count)
    # (array_agg of no rows is NULL: none of them was new)
    return Stored(count, set(zip(ids or (), tss or (), strict=True)))


def _columns_of_rejections(rows: Sequence[RejectionRow]) -> list[list[Any]]:
    return [
        [r.received_at for r in rows],
        [r.source for r in rows],
        [r.topic_or_route for r in rows],
        [r.payload for r in rows],
        [r.reason for r in rows],
    ]
