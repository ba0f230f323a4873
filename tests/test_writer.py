"""The shared write path: buffering, group commit, isolation of refused rows, retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from db.partitions import prepare_schema, upkeep
from db.pool import create_pool
from db.writes import FlushBatch, Stored
from ingest.flushing import PoolFlush
from ingest.readings import MeterReading, VehicleReading
from ingest.writer import Outcome, Overloaded, Submission, Writer
from tests.services import running_postgres

NOW = datetime.now(UTC).replace(microsecond=0)


def meter(meter_id: str, minutes_ago: float, kwh: float = 1.0) -> MeterReading:
    return MeterReading(
        meter_id=meter_id,
        kwh_consumed_ac=kwh,
        voltage=230.0,
        timestamp=NOW - timedelta(minutes=minutes_ago),
    )


def vehicle(vehicle_id: str, minutes_ago: float) -> VehicleReading:
    return VehicleReading(
        vehicle_id=vehicle_id,
        soc=40.0,
        kwh_delivered_dc=0.9,
        battery_temp=20.0,
        timestamp=NOW - timedelta(minutes=minutes_ago),
    )


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(db_url, schema="public", max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def writer(pool: asyncpg.Pool) -> AsyncIterator[Writer]:
    w = Writer(
        PoolFlush(pool), flush_max_readings=100, flush_interval_s=0.02, buffer_max_readings=1000
    )
    task = asyncio.create_task(w.run())
    yield w
    w.stop()
    await asyncio.wait_for(task, 10)


async def test_write_answers_after_commit_with_counts(writer: Writer, pool: asyncpg.Pool) -> None:
    outcome = await writer.write(
        [meter("M1", 2), meter("M1", 1), vehicle("V1", 1)], [], transport="http"
    )
    assert outcome == Outcome(accepted=3, duplicates=0)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM meter_readings") == 2


async def test_the_same_reading_twice_counts_once(writer: Writer, pool: asyncpg.Pool) -> None:
    first, second = await asyncio.gather(
        writer.write([meter("M1", 1)], [], transport="mqtt"),
        writer.write([meter("M1", 1), meter("M1", 0)], [], transport="http"),
    )
    assert first.accepted + second.accepted == 2
    assert first.duplicates + second.duplicates == 1
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM meter_readings") == 2


async def test_a_reading_the_database_refuses_is_rejected_and_the_rest_written(
    writer: Writer, pool: asyncpg.Pool
) -> None:
    # A value only the table's CHECK refuses (validation would normally stop it earlier).
    bad = MeterReading.model_construct(
        meter_id="M2", kwh_consumed_ac=1.0, voltage=5000.0, timestamp=NOW
    )
    outcomes = await asyncio.gather(
        writer.write([meter("M1", 1)], [], transport="http"),
        writer.write([meter("M2", 1), bad, meter("M2", 2)], [], transport="http"),
    )
    assert outcomes[0].accepted == 1
    assert outcomes[1].accepted == 2 and len(outcomes[1].refused_by_database) == 1
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM meter_readings") == 3
        row = await conn.fetchrow("SELECT payload, reason FROM rejections")
    assert "refused by the database" in row["reason"] and "voltage_check" in row["reason"]
    assert '"voltage":5000.0' in row["payload"]


async def test_readings_without_a_partition_are_held_until_it_exists(
    writer: Writer, pool: asyncpg.Pool
) -> None:
    """A missing partition is the database's fault, not the readings': they are neither
    rejected nor acknowledged, the rest is written (the other reading of the same message
    too, though the message waits), and they are stored once it exists."""
    next_year = NOW + timedelta(days=365)
    beyond = MeterReading.model_construct(
        meter_id="M2", kwh_consumed_ac=1.0, voltage=230.0, timestamp=next_year
    )
    held = asyncio.create_task(
        writer.write([meter("M2", 1), beyond], [], transport="mqtt", timeout_s=30)
    )
    assert (await writer.write([meter("M1", 1)], [], transport="http")).accepted == 1
    await asyncio.sleep(0.3)
    assert not held.done() and writer.held_readings == 1
    assert writer.flusher.last_failure is not None
    assert writer.flusher.last_failure.sqlstate == "23514"
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM meter_readings") == 2
        assert await conn.fetchval("SELECT count(*) FROM rejections") == 0
        await upkeep(conn, schema="public", now=next_year, retention_days=400, lookahead_days=1)
    writer.retry_held_now()
    assert (await asyncio.wait_for(held, 10)).accepted == 2
    assert writer.held_readings == 0 and writer.status().held_since is None
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM meter_readings") == 3


async def test_flush_size_triggers_a_flush_before_the_interval(pool: asyncpg.Pool) -> None:
    writer = Writer(
        PoolFlush(pool), flush_max_readings=5, flush_interval_s=30, buffer_max_readings=100
    )
    task = asyncio.create_task(writer.run())
    try:
        outcome = await asyncio.wait_for(
            writer.write([meter("M1", m) for m in range(5)], [], transport="http"), 5
        )
        assert outcome.accepted == 5
    finally:
        writer.stop()
        await asyncio.wait_for(task, 10)


async def test_a_full_buffer_refuses_new_writes(pool: asyncpg.Pool) -> None:
    writer = Writer(
        PoolFlush(pool), flush_max_readings=1000, flush_interval_s=30, buffer_max_readings=3
    )
    writer.submit(Submission([meter("M1", m) for m in range(3)], [], lambda o: None, "mqtt"))
    with pytest.raises(Overloaded):
        await writer.write([meter("M1", 10)], [], transport="http")


async def test_writes_wait_out_a_database_outage() -> None:
    with running_postgres() as pg:
        url = f"postgresql://postgres@127.0.0.1:{pg.port}/energy"
        conn = await asyncpg.connect(url)
        await prepare_schema(conn, schema="public", retention_days=30, lookahead_days=3, now=NOW)
        await conn.close()
        pool = await create_pool(url, schema="public", max_size=2)
        writer = Writer(
            PoolFlush(pool), flush_max_readings=10, flush_interval_s=0.01, buffer_max_readings=99
        )
        task = asyncio.create_task(writer.run())
        try:
            await asyncio.to_thread(pg.stop)
            pending = asyncio.create_task(writer.write([meter("M1", 1)], [], transport="http"))
            await asyncio.sleep(1.0)
            assert not pending.done() and not writer.database_ok
            await asyncio.to_thread(pg.start)
            outcome = await asyncio.wait_for(pending, 30)
            assert outcome.accepted == 1
            conn = await asyncpg.connect(url)
            assert await conn.fetchval("SELECT count(*) FROM meter_readings") == 1
            await conn.close()
        finally:
            writer.stop()
            await asyncio.wait_for(task, 10)
            await pool.close()


async def never_flushes(batch: FlushBatch) -> dict[str, Stored]:
    raise AssertionError("no flusher runs in this test")


async def test_a_caller_waiting_for_a_commit_that_does_not_come_hears_overloaded() -> None:
    # No flusher runs: nothing ever commits. Pure logic, no database needed.
    writer = Writer(
        never_flushes,
        flush_max_readings=100,
        flush_interval_s=0.01,
        buffer_max_readings=1000,
    )
    started = asyncio.get_running_loop().time()
    waits = [
        asyncio.create_task(writer.write([meter("M1", 1)], [], transport="http", timeout_s=t))
        for t in (0.6, 0.2)
    ]
    # The shorter wait ends first although it began second.
    for wait, timeout_s in ((waits[1], 0.2), (waits[0], 0.6)):
        with pytest.raises(Overloaded, match=f"no commit within {timeout_s} s"):
            await wait
        elapsed = asyncio.get_running_loop().time() - started
        assert timeout_s <= elapsed < timeout_s + 0.3, elapsed
    # The readings stay buffered: they are still written once a flusher runs.
    assert writer.depth == 2
