"""The roll-ups off the flush (db/rollup.py): flushes append deltas, folds move them into the
hourly roll-ups. For any interleaving of flushes (new readings, copies, late ones, several
hours of one device in one flush) and folds (of any batch size, two at once), every stored
reading is counted once: in the deltas or in the roll-ups, as a reader sees them at any
moment, and in the roll-ups alone once everything is folded; the SoC of an hour is that of
its newest reading.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db.rollup import fold
from db.writes import FlushBatch, flush_batch
from tests.streams import assert_rollups_match_history, compare_rollups

NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
OLDEST = datetime(2000, 1, 1, tzinfo=UTC)

# (device, minutes before the current hour's start + 60, kWh, SoC): up to three hours back,
# so a flush can touch several hours of a device and a reading can arrive after its hour
# was folded.
reading = st.tuples(st.integers(0, 3), st.integers(-59, 180), st.floats(0, 50), st.floats(0, 100))
operation = st.one_of(
    st.tuples(st.just("flush"), st.lists(reading, min_size=1, max_size=12)),
    st.tuples(st.just("fold"), st.integers(1, 5)),
)


def rows(prefix: str, readings: list[tuple[int, int, float, float]]) -> FlushBatch:
    batch = FlushBatch()
    for device, minutes, kwh, soc in readings:
        ts = NOW - timedelta(minutes=minutes)
        batch.rows["meter"].append((f"{prefix}M{device}", ts, kwh, 230.0, NOW))
        batch.rows["vehicle"].append((f"{prefix}V{device}", ts, soc, kwh, 20.0, NOW))
    return batch


async def check_newest_soc(conn: asyncpg.Connection, prefix: str) -> None:
    """After folding: each hour's last_ts and last_soc are those of its newest reading."""
    wrong = await conn.fetchval(
        """
        SELECT count(*) FROM vehicle_hourly h
        JOIN LATERAL (
            SELECT ts, soc FROM vehicle_readings v
            WHERE v.vehicle_id = h.vehicle_id AND v.ts >= h.hour
              AND v.ts < h.hour + interval '1 hour'
            ORDER BY ts DESC LIMIT 1
        ) newest ON true
        WHERE h.vehicle_id LIKE $1 || '%' AND (newest.ts, newest.soc) <> (h.last_ts, h.last_soc)
        """,
        prefix,
    )
    assert wrong == 0


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=st.lists(operation, min_size=1, max_size=12))
async def test_any_interleaving_of_flushes_and_folds_counts_each_reading_once(
    conn: asyncpg.Connection, operations: list[tuple[str, Any]]
) -> None:
    prefix = uuid.uuid4().hex[:8]
    for kind, argument in operations:
        if kind == "flush":
            await flush_batch(conn, rows(prefix, argument))
        else:
            await fold(conn, schema="public", oldest_hour=OLDEST, batch=argument)
        # As a reader sees them at every step: the deltas and the roll-ups together.
        await compare_rollups(conn, "hourly_all", None, None)
    await assert_rollups_match_history(conn)  # and, everything folded, the roll-ups alone
    await check_newest_soc(conn, prefix)


async def test_folds_racing_each_other_and_the_flushes_lose_and_double_nothing(
    db_url: str,
) -> None:
    """Two daemons' folds (small batches) and four flushing connections at once."""
    prefix = uuid.uuid4().hex[:8]
    flushed = asyncio.Event()

    async def flusher(n: int) -> None:
        conn = await asyncpg.connect(db_url)
        try:
            for i in range(40):
                readings = [(d, (i * 7 + d * 13 + n) % 200 - 20, 0.5, float(i)) for d in range(4)]
                await flush_batch(conn, rows(f"{prefix}{n}", readings))
        finally:
            await conn.close()

    async def folder() -> int:
        conn = await asyncpg.connect(db_url)
        moved = 0
        try:
            while not flushed.is_set():
                moved += await fold(conn, schema="public", oldest_hour=OLDEST, batch=7) or 0
        finally:
            await conn.close()
        return moved

    folders = [asyncio.create_task(folder()) for _ in range(2)]
    await asyncio.gather(*(flusher(n) for n in range(4)))
    flushed.set()
    assert sum(await asyncio.gather(*folders)) > 0  # the folds did run during the flushes
    conn = await asyncpg.connect(db_url)
    try:
        await assert_rollups_match_history(conn)
        await check_newest_soc(conn, prefix)
    finally:
        await conn.close()


async def test_deltas_older_than_the_kept_partitions_are_dropped_not_folded(
    conn: asyncpg.Connection,
) -> None:
    """A delta whose day was dropped (retention) cannot go to a partition that is gone: the
    fold drops it rather than fail forever."""
    await conn.execute(
        "INSERT INTO meter_hour_deltas VALUES ('old', $1, 1.0, 1)", NOW - timedelta(days=400)
    )
    moved = await fold(conn, schema="public", oldest_hour=NOW - timedelta(days=30))
    assert moved == 1
    assert await conn.fetchval("SELECT count(*) FROM meter_hour_deltas") == 0
    assert await conn.fetchval("SELECT count(*) FROM meter_hourly WHERE meter_id = 'old'") == 0
