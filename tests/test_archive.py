"""History that lasts: raw day partitions archived to Parquet (exported, read back, verified,
then dropped), and roll-ups kept for ROLLUP_RETENTION_DAYS after the raw history is gone.

Readings go into the history through the daemon's own flush statement (which keeps the
roll-ups); the files are read back with DuckDB, as an operator would."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db import parquet
from db.archive import ArchiveError, archive_partition
from db.parquet import MANIFEST, sha256_of
from db.partitions import partition_name, upkeep
from db.rollup import fold
from db.tables import METER, VEHICLE, StreamTables
from db.writes import FlushBatch, flush_batch
from ingest.config import Settings


def duck(sql: str) -> list[tuple[Any, ...]]:
    """A query's rows, as DuckDB answers it."""
    relation = duckdb.sql(sql)
    assert relation is not None
    return [tuple(r) for r in relation.fetchall()]


TODAY = datetime.now(UTC).date()
OLD_DAY = TODAY - timedelta(days=5)  # within the test template's 30 days of partitions
OLDEST = datetime(2000, 1, 1, tzinfo=UTC)
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def history_of(conn: asyncpg.Connection, t: StreamTables, day: date) -> list[tuple[Any, ...]]:
    """The day's rows, times as microseconds since the epoch, in (device, time) order."""
    columns = ", ".join(
        f"(extract(epoch FROM {c}) * 1000000)::bigint" if c in ("ts", "received_at") else c
        for c in t.columns
    )
    rows = await conn.fetch(
        f'SELECT {columns} FROM "{partition_name(t.history, day)}" '
        f'ORDER BY {t.id_column} COLLATE "C", ts'
    )
    return [tuple(r) for r in rows]


def parquet_rows(path: Path, t: StreamTables) -> list[tuple[Any, ...]]:
    columns = ", ".join(f"epoch_us({c})" if c in ("ts", "received_at") else c for c in t.columns)
    sql = f"SELECT {columns} FROM '{path}' ORDER BY {t.id_column}, ts"
    return duck(sql)


async def partition_exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


# Any reading of a day: ids of the whole alphabet, any microsecond, any finite value in range
# (subnormals, 0, 1000 included); several of a device at one moment (the first stands).
device = st.text(ID_ALPHABET, min_size=1, max_size=64)
micro = st.integers(0, 86_400 * 1_000_000 - 1)
kwh = st.floats(0, 1000, allow_nan=False, allow_infinity=False)
meter = st.tuples(device, micro, kwh, st.floats(0, 1000))
vehicle = st.tuples(device, micro, st.floats(0, 100), kwh, st.floats(-50, 120))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    meters=st.lists(meter, max_size=40),
    vehicles=st.lists(vehicle, max_size=40),
)
async def test_any_day_of_readings_round_trips_exactly_through_parquet(
    conn: asyncpg.Connection,
    tmp_path_factory: pytest.TempPathFactory,
    meters: list[tuple[str, int, float, float]],
    vehicles: list[tuple[str, int, float, float, float]],
) -> None:
    archive_dir = tmp_path_factory.mktemp("archive")
    now = datetime.now(UTC)
    await upkeep(conn, schema="public", now=now, retention_days=30, lookahead_days=1)
    start = midnight(OLD_DAY)
    batch = FlushBatch()
    for name, ms, energy, volts in meters:
        at = start + timedelta(microseconds=ms)
        batch.rows["meter"].append((name, at, energy, volts, now))
    for name, ms, soc, energy, temp in vehicles:
        at = start + timedelta(microseconds=ms)
        batch.rows["vehicle"].append((name, at, soc, energy, temp, now))
    await flush_batch(conn, batch)
    for t in (METER, VEHICLE):
        before = await history_of(conn, t, OLD_DAY)
        partition = partition_name(t.history, OLD_DAY)
        done = await archive_partition(
            conn, schema="public", partition=partition, archive_dir=archive_dir
        )
        assert done is not None and done.rows == len(before)
        assert not await partition_exists(conn, partition)
        path = archive_dir / t.stream / f"{OLD_DAY.isoformat()}.parquet"
        assert parquet_rows(path, t) == sorted(before, key=lambda r: (r[0].encode(), r[1]))
        entry = json.loads((archive_dir / MANIFEST).read_text())["files"][
            f"{t.stream}/{OLD_DAY.isoformat()}.parquet"
        ]
        assert entry["rows"] == len(before) and entry["sha256"] == sha256_of(path)


async def test_a_failed_export_keeps_the_partition_and_leaves_no_file(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    batch = FlushBatch()
    batch.rows["meter"].append(("M1", midnight(OLD_DAY) + timedelta(hours=3), 1.5, 230.0, now))
    await flush_batch(conn, batch)
    (tmp_path / "meter").write_text("a file where the stream's folder should be")
    partition = partition_name(METER.history, OLD_DAY)
    with pytest.raises(ArchiveError, match=partition):
        await archive_partition(conn, schema="public", partition=partition, archive_dir=tmp_path)
    assert await partition_exists(conn, partition)
    assert await conn.fetchval(f'SELECT count(*) FROM "{partition}"') == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meter"]  # no manifest, no file
    # The way cleared, the next try archives it.
    (tmp_path / "meter").unlink()
    done = await archive_partition(conn, schema="public", partition=partition, archive_dir=tmp_path)
    assert done is not None and done.rows == 1 and done.kwh == 1.5
    assert not await partition_exists(conn, partition)


async def test_rollups_outlive_the_raw_history_until_their_own_retention(
    conn: asyncpg.Connection,
) -> None:
    """Upkeep three days on, raw retention 2 days, roll-ups 6: raw partitions older than 2
    days are dropped, roll-up partitions only when older than 6; what the roll-ups of a day
    past raw retention held is still there."""
    now = datetime.now(UTC)
    batch = FlushBatch()
    for back in range(1, 10):
        day = TODAY - timedelta(days=back)
        batch.rows["meter"].append(("M1", midnight(day) + timedelta(hours=5), float(back), 1, now))
    await flush_batch(conn, batch)
    await fold(conn, schema="public", oldest_hour=OLDEST)
    later = now + timedelta(days=3)
    report = await upkeep(
        conn,
        schema="public",
        now=later,
        retention_days=2,
        lookahead_days=1,
        rollup_retention_days=6,
    )
    raw_first = (later - timedelta(days=2)).date()
    rollup_first = (later - timedelta(days=6)).date()
    for back in range(1, 10):
        day = TODAY - timedelta(days=back)
        raw = partition_name(METER.history, day)
        rollup = partition_name(METER.hourly, day)
        assert await partition_exists(conn, raw) == (day >= raw_first)
        assert await partition_exists(conn, rollup) == (day >= rollup_first), day
        assert (raw in report.dropped) == (day < raw_first)
        assert (rollup in report.dropped) == (day < rollup_first)
    kept = await conn.fetch(
        "SELECT hour, kwh_consumed_ac FROM meter_hourly WHERE meter_id = 'M1' ORDER BY hour"
    )
    expected = [
        (midnight(TODAY - timedelta(days=back)) + timedelta(hours=5), float(back))
        for back in range(9, 0, -1)
        if TODAY - timedelta(days=back) >= rollup_first
    ]
    assert [(r["hour"], r["kwh_consumed_ac"]) for r in kept] == expected
    assert expected  # (some day past raw retention kept its roll-ups)
    # With an archive, upkeep leaves raw partitions past retention to it.
    archived = await upkeep(
        conn,
        schema="public",
        now=later + timedelta(days=1),
        retention_days=2,
        lookahead_days=1,
        rollup_retention_days=6,
        archive=True,
    )
    assert archived.expired and not any(n.startswith("meter_readings") for n in archived.dropped)
    assert all([await partition_exists(conn, n) for n in archived.expired])


async def test_an_archived_day_is_never_overwritten(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """A day's partition made again after it was archived (RETENTION_DAYS raised for a while,
    `migrate` run with a longer one): empty, it is dropped and the file kept; holding
    readings, it is kept, and the file too."""
    now = datetime.now(UTC)
    partition = partition_name(METER.history, OLD_DAY)
    path = tmp_path / "meter" / f"{OLD_DAY.isoformat()}.parquet"
    batch = FlushBatch()
    batch.rows["meter"].append(("M1", midnight(OLD_DAY) + timedelta(hours=3), 1.5, 230.0, now))
    await flush_batch(conn, batch)
    first = await archive_partition(
        conn, schema="public", partition=partition, archive_dir=tmp_path
    )
    assert first is not None and first.rows == 1 and not first.before
    archived = (path.read_bytes(), (tmp_path / MANIFEST).read_bytes())

    await upkeep(conn, schema="public", now=now, retention_days=30, lookahead_days=1)
    again = await archive_partition(
        conn, schema="public", partition=partition, archive_dir=tmp_path
    )
    assert again is not None and again.before and again.rows == 0
    assert not await partition_exists(conn, partition)
    assert (path.read_bytes(), (tmp_path / MANIFEST).read_bytes()) == archived

    await upkeep(conn, schema="public", now=now, retention_days=30, lookahead_days=1)
    batch = FlushBatch()
    batch.rows["meter"].append(("M2", midnight(OLD_DAY) + timedelta(hours=4), 2.5, 230.0, now))
    await flush_batch(conn, batch)
    with pytest.raises(ArchiveError, match="nothing is overwritten"):
        await archive_partition(conn, schema="public", partition=partition, archive_dir=tmp_path)
    assert await conn.fetchval(f'SELECT count(*) FROM "{partition}"') == 1
    assert (path.read_bytes(), (tmp_path / MANIFEST).read_bytes()) == archived


async def test_a_manifest_that_is_not_one_is_named_and_nothing_dropped(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    batch = FlushBatch()
    at = midnight(OLD_DAY) + timedelta(hours=3)
    batch.rows["meter"].append(("M1", at, 1.5, 230.0, datetime.now(UTC)))
    await flush_batch(conn, batch)
    (tmp_path / MANIFEST).write_text('{"version": 1}')
    partition = partition_name(METER.history, OLD_DAY)
    with pytest.raises(ArchiveError, match="is not an archive manifest"):
        await archive_partition(conn, schema="public", partition=partition, archive_dir=tmp_path)
    assert await partition_exists(conn, partition)


def test_a_writer_that_cannot_start_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a full disk: the file is opened, its header cannot be written."""

    def full_disk(where: Path, *args: Any, **kwargs: Any) -> None:
        Path(where).write_bytes(b"")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("db.parquet.pq.ParquetWriter", full_disk)
    with pytest.raises(OSError, match="No space"):
        parquet.PartWriter(tmp_path / "meter" / "2026-01-01.parquet", METER)
    assert list((tmp_path / "meter").iterdir()) == []


@given(blank=st.text(" \t", max_size=3))
def test_an_empty_archive_dir_is_no_archive(blank: str) -> None:
    """Not the working directory: partitions would go for files in a throwaway place."""
    assert Settings(archive_dir=blank).archive_dir is None
    assert Settings(archive_dir="/srv/archive").archive_dir == Path("/srv/archive")
