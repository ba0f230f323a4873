"""The flush transaction against a real PostgreSQL: history, latest state, duplicates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db.writes import (
    FlushBatch,
    RejectionRow,
    Stored,
    flush_batch,
    microseconds_array,
    text_array,
)

NOW = datetime.now(UTC).replace(microsecond=0)


def meter_row(meter_id: str, minutes_ago: int, kwh: float = 1.0) -> tuple[object, ...]:
    return (meter_id, NOW - timedelta(minutes=minutes_ago), kwh, 230.0, NOW)


def vehicle_row(vehicle_id: str, minutes_ago: int, soc: float = 50.0) -> tuple[object, ...]:
    return (vehicle_id, NOW - timedelta(minutes=minutes_ago), soc, 0.9, 25.0, NOW)


async def flush(conn: asyncpg.Connection, meters=(), vehicles=(), rejections=()):  # type: ignore[no-untyped-def]
    batch = FlushBatch()
    batch.rows["meter"].extend(meters)
    batch.rows["vehicle"].extend(vehicles)
    batch.rejections.extend(rejections)
    return await flush_batch(conn, batch)


async def test_readings_land_in_history_and_latest(conn: asyncpg.Connection) -> None:
    inserted = await flush(
        conn,
        meters=[meter_row("M1", 2), meter_row("M1", 1, kwh=2.0)],
        vehicles=[vehicle_row("V1", 1)],
    )
    # Every row new: only the count comes back.
    assert inserted["meter"] == Stored() and inserted["vehicle"] == Stored()
    assert await conn.fetchval("SELECT count(*) FROM meter_readings") == 2
    latest = await conn.fetchrow("SELECT ts, kwh_consumed_ac FROM meter_latest WHERE meter_id='M1'")
    assert latest["ts"] == NOW - timedelta(minutes=1) and latest["kwh_consumed_ac"] == 2.0
    assert await conn.fetchval("SELECT soc FROM vehicle_latest WHERE vehicle_id='V1'") == 50.0


async def test_duplicate_reading_is_stored_once_and_reported(conn: asyncpg.Connection) -> None:
    await flush(conn, meters=[meter_row("M1", 1)])
    inserted = await flush(conn, meters=[meter_row("M1", 1), meter_row("M1", 0)])
    earlier = ("M1", NOW - timedelta(minutes=1))
    # What was stored now, and what the other key already held (to tell a copy from a
    # conflict).
    assert inserted["meter"] == Stored({("M1", NOW)}, {earlier: (1.0, 230.0)})
    assert await conn.fetchval("SELECT count(*) FROM meter_readings") == 2


async def test_same_reading_twice_in_one_batch_is_stored_once(conn: asyncpg.Connection) -> None:
    # (The writer sends each key once; the statement alone stores a key twice offered once.)
    inserted = await flush(conn, meters=[meter_row("M1", 1), meter_row("M1", 1)])
    assert inserted["meter"] == Stored({("M1", NOW - timedelta(minutes=1))})
    assert await conn.fetchval("SELECT count(*) FROM meter_readings") == 1


async def test_late_reading_does_not_overwrite_latest(conn: asyncpg.Connection) -> None:
    await flush(conn, vehicles=[vehicle_row("V1", 1, soc=80.0)])
    await flush(conn, vehicles=[vehicle_row("V1", 30, soc=20.0)])
    latest = await conn.fetchrow("SELECT ts, soc FROM vehicle_latest WHERE vehicle_id='V1'")
    assert (latest["ts"], latest["soc"]) == (NOW - timedelta(minutes=1), 80.0)
    assert await conn.fetchval("SELECT count(*) FROM vehicle_readings") == 2


async def test_rejections_are_written_in_the_same_transaction(conn: asyncpg.Connection) -> None:
    rejection = RejectionRow(NOW, "mqtt", "meters/M1/telemetry", "nope", "not valid JSON")
    await flush(conn, meters=[meter_row("M1", 1)], rejections=[rejection])
    row = await conn.fetchrow("SELECT source, payload, reason FROM rejections")
    assert tuple(row) == ("mqtt", "nope", "not valid JSON")


async def test_a_refused_row_rolls_back_the_whole_batch(conn: asyncpg.Connection) -> None:
    outside_partitions = ("M1", NOW + timedelta(days=365), 1.0, 230.0, NOW)
    with pytest.raises(asyncpg.PostgresError) as caught:
        await flush(conn, meters=[meter_row("M1", 1), outside_partitions])
    assert caught.value.sqlstate.startswith("23")
    assert await conn.fetchval("SELECT count(*) FROM meter_readings") == 0
    assert await conn.fetchval("SELECT count(*) FROM meter_latest") == 0


async def test_a_batch_of_duplicates_only_stores_nothing(conn: asyncpg.Connection) -> None:
    await flush(conn, meters=[meter_row("M1", 1)])
    inserted = await flush(conn, meters=[meter_row("M1", 1)])
    key = ("M1", NOW - timedelta(minutes=1))
    assert inserted["meter"] == Stored(set(), {key: (1.0, 230.0)})
    assert not inserted["meter"].is_new(key)


async def test_the_latest_state_is_what_the_history_took(conn: asyncpg.Connection) -> None:
    """A reading at a stored moment with other values changes neither the history nor the
    latest state (they used to disagree: the latest row came from what was offered)."""
    await flush(conn, meters=[meter_row("M1", 1)])
    await flush(conn, meters=[("M1", NOW - timedelta(minutes=1), 9.0, 231.0, NOW)])
    history = await conn.fetchval("SELECT kwh_consumed_ac FROM meter_readings")
    latest = await conn.fetchval("SELECT kwh_consumed_ac FROM meter_latest")
    assert history == latest == 1.0


# Any text PostgreSQL can hold (no NUL, no lone surrogate), "NULL", quotes and backslashes.
_TEXTS = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8", exclude_characters="\x00")),
        st.sampled_from(["NULL", "null", '"', "\\", '\\"', "{", "}", ",", " ", ""]),
    ),
    max_size=20,
)
# Any instant within the exact range, at the microsecond, in any offset.
_INSTANTS = st.lists(
    st.datetimes(
        min_value=datetime(1690, 1, 1),
        max_value=datetime(2250, 12, 31),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-9, minutes=-30))]),
    ),
    max_size=20,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(texts=_TEXTS, instants=_INSTANTS)
async def test_the_flush_literals_carry_every_value_exactly(
    conn: asyncpg.Connection, texts: list[str], instants: list[datetime]
) -> None:
    """Ids and timestamps travel to the flush as array literals (db.writes): PostgreSQL reads
    back exactly the values written, whatever they hold."""
    assert await conn.fetchval("SELECT $1::text::text[]", text_array(texts)) == texts
    stored = await conn.fetchval(
        "SELECT array(SELECT timestamptz 'epoch' + u * interval '1 microsecond'"
        " FROM unnest($1::text::int8[]) WITH ORDINALITY AS x(u, n) ORDER BY n)",
        microseconds_array(instants),
    )
    assert stored == instants


def test_a_timestamp_past_the_exact_range_is_refused_not_rounded() -> None:
    with pytest.raises(ValueError, match="cannot be stored"):
        microseconds_array([datetime(9999, 12, 31, tzinfo=UTC)])
