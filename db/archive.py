"""Raw day partitions past retention, exported to Parquet, verified, then dropped.

One partition at a time, in one REPEATABLE READ transaction:

1. an advisory lock (one archiver per schema, whichever daemon; the others skip);
2. `LOCK TABLE <partition> IN SHARE MODE` before the snapshot is taken: nothing can be
   written into it any more (a partition past retention gets no writes anyway: readings
   older than RETENTION_DAYS are refused at validation), reads go on;
3. its figures (rows, kWh, first and last time), in that snapshot;
4. `COPY (SELECT … ORDER BY device, ts) TO STDOUT (FORMAT csv)`, in that snapshot, streamed
   in chunks to a Parquet writer running in a thread (zstd, row groups of 100,000 rows), the
   file written under a temporary name, fsynced, renamed, its directory fsynced;
5. the file read back with pyarrow: its rows and first and last time must equal the
   partition's, its kWh agree to rounding; then its entry (rows, kWh, sha256, …) goes into
   the manifest;
6. `DROP TABLE <partition>`, its parent locked first (`db.partitions.drop_partition`), and
   the commit.

Anything failing rolls the transaction back: the partition stays, to be tried again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import asyncpg

from db import parquet
from db.migrate import lock_key
from db.partitions import drop_partition, partition_day
from db.tables import StreamTables

CHUNK_BYTES = 8 * 1024 * 1024  # COPY text parsed at a time (about 100,000 readings)
EPOCH_US = "(extract(epoch FROM {column}) * 1000000)::bigint"


class ArchiveError(Exception):
    """A partition could not be archived; it is kept."""


@dataclass(frozen=True, slots=True)
class Archived:
    partition: str
    stream: str
    day: date
    path: Path
    rows: int
    kwh: float
    sha256: str
    bytes: int
    before: bool = False  # archived before: an empty partition made since, dropped


def copy_sql(t: StreamTables, partition: str) -> str:
    """The partition's rows as CSV, times as integer microseconds since the epoch (exact,
    whatever the session's time zone), in the primary key's order (device, time)."""
    columns = [EPOCH_US.format(column=c) if c in ("ts", "received_at") else c for c in t.columns]
    return f'SELECT {", ".join(columns)} FROM "{partition}" ORDER BY {t.id_column}, ts'


def figures_sql(t: StreamTables, partition: str) -> str:
    return (
        f"SELECT count(*) AS rows, coalesce(sum({parquet.energy_column(t)}), 0) AS kwh, "
        f'min(ts) AS first_ts, max(ts) AS last_ts FROM "{partition}"'
    )


async def archive_partition(
    conn: asyncpg.Connection, *, schema: str, partition: str, archive_dir: Path
) -> Archived | None:
    """Export, verify and drop one raw day partition; None when another daemon is
    archiving (or the partition is gone already). Raises ArchiveError (the partition kept)."""
    t, _ = parquet.stream_of(partition)
    day = partition_day(partition)
    if day is None:
        raise ArchiveError(f"{partition}: no day in its name")
    key = lock_key(schema, "archive")
    if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
        return None
    try:
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{partition}"'):
            return None
        return await _archive_locked(conn, t, partition, day, archive_dir)
    except ArchiveError:
        raise
    except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        raise ArchiveError(f"{partition}: {error.__class__.__name__}: {error}") from error
    except Exception as error:  # pyarrow's own errors (ArrowException and its kin)
        if error.__class__.__module__.startswith("pyarrow"):
            raise ArchiveError(f"{partition}: {error.__class__.__name__}: {error}") from error
        raise
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)


async def _archive_locked(
    conn: asyncpg.Connection, t: StreamTables, partition: str, day: date, archive_dir: Path
) -> Archived:
    """The transaction itself. Its snapshot is taken by its first query, after the lock:
    the figures and the rows exported are all the partition will ever hold."""
    relative = parquet.relative_path(t.stream, day)
    path = archive_dir / relative
    async with conn.transaction(isolation="repeatable_read"):
        await conn.execute("SET LOCAL lock_timeout = '5s'")
        await conn.execute(f'LOCK TABLE "{partition}" IN SHARE MODE')
        row = await conn.fetchrow(figures_sql(t, partition))
        expected = parquet.Figures(
            int(row["rows"]), float(row["kwh"]), row["first_ts"], row["last_ts"]
        )
        before = await asyncio.to_thread(parquet.archived_entry, archive_dir, relative)
        if before is not None:  # never overwritten: its partition is gone
            return await _archived_before(conn, t, partition, day, path, expected, before)
        archived = await _export(conn, t, partition, day, path, expected)
        entry = parquet.manifest_entry(t, day, expected, archived.sha256, archived.bytes, partition)
        await asyncio.to_thread(
            parquet.record_in_manifest,
            archive_dir,
            relative,
            entry,
        )
        await drop_partition(conn, t.history, partition)
        return archived


async def _archived_before(
    conn: asyncpg.Connection,
    t: StreamTables,
    partition: str,
    day: date,
    path: Path,
    expected: parquet.Figures,
    before: dict[str, Any],
) -> Archived:
    """A day archived before, whose partition was made again since (RETENTION_DAYS raised
    for a while, `energy-ingest migrate` run with a longer one): empty, it is dropped and the
    file kept; holding readings, it is kept, and the reason says what to do."""
    if expected.rows:
        raise ArchiveError(
            f"{partition}: {path} was archived before with {before.get('rows')} readings, and "
            f"the partition holds {expected.rows} more: move that file aside (and its entry "
            "out of manifest.json) to archive the day again, or keep the partition longer "
            "(RETENTION_DAYS); nothing is overwritten"
        )
    await drop_partition(conn, t.history, partition)
    sha256 = str(before.get("sha256"))
    return Archived(partition, t.stream, day, path, 0, 0.0, sha256, 0, before=True)


async def _export(
    conn: asyncpg.Connection,
    t: StreamTables,
    partition: str,
    day: date,
    path: Path,
    expected: parquet.Figures,
) -> Archived:
    """The partition's rows into the file at `path` (in place once complete), read back
    and compared with `expected`."""
    writer = await asyncio.to_thread(parquet.PartWriter, path, t)
    try:
        sink = _Sink(writer)
        await conn.copy_from_query(copy_sql(t, partition), output=sink.take, format="csv")
        await sink.flush()
        await asyncio.to_thread(writer.finish)
        await asyncio.to_thread(writer.publish)
    except BaseException:
        await asyncio.to_thread(writer.discard)
        raise
    got, sha256, size = await asyncio.to_thread(parquet.read_back, path, t)
    check(partition, expected, got)
    return Archived(partition, t.stream, day, path, got.rows, got.kwh, sha256, size)


def check(partition: str, expected: parquet.Figures, got: parquet.Figures) -> None:
    """The file holds what the partition holds, or ArchiveError says what differs."""
    problems = []
    if got.rows != expected.rows:
        problems.append(f"{got.rows} rows in the file, {expected.rows} in the partition")
    if not parquet.sums_agree(got.kwh, expected.kwh):
        problems.append(f"{got.kwh!r} kWh in the file, {expected.kwh!r} in the partition")
    if (got.first_ts, got.last_ts) != (expected.first_ts, expected.last_ts):
        problems.append(
            f"times {got.first_ts}..{got.last_ts} in the file, "
            f"{expected.first_ts}..{expected.last_ts} in the partition"
        )
    if problems:
        raise ArchiveError(f"{partition}: read back does not match: {'; '.join(problems)}")


class _Sink:
    """COPY's output, handed to the Parquet writer's thread in chunks of whole lines:
    COPY waits while a chunk is parsed and written, so memory stays bounded."""

    def __init__(self, writer: parquet.PartWriter) -> None:
        self._writer = writer
        self._buffer = bytearray()

    async def take(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= CHUNK_BYTES:
            cut = self._buffer.rfind(b"\n") + 1
            chunk = bytes(self._buffer[:cut])
            del self._buffer[:cut]
            await asyncio.to_thread(self._writer.add, chunk)

    async def flush(self) -> None:
        chunk, self._buffer = bytes(self._buffer), bytearray()
        await asyncio.to_thread(self._writer.add, chunk)


def oldest_first(names: list[str]) -> list[str]:
    """Day partitions in the order they are archived: by day, then by name."""
    return sorted(names, key=lambda n: (partition_day(n) or date.min, n))
