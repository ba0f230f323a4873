"""The bound on the `rejections` table: the newest rows are kept, the oldest go first."""

from __future__ import annotations

import asyncpg

from db.tables import REJECTIONS

# Ids grow with every row written (an identity), so "all but the newest N" is a range of the
# primary key: no scan, no sort.
TRIM = f"""
DELETE FROM {REJECTIONS}
WHERE id <= (SELECT max(id) FROM {REJECTIONS}) - $1"""


async def trim_rejections(conn: asyncpg.Connection, keep_rows: int) -> int:
    """Delete all but the newest `keep_rows` rejections; returns how many went."""
    status: str = await conn.execute(TRIM, keep_rows)
    return int(status.split()[-1])
