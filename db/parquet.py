"""The archive's files: one Parquet file per stream and day, written atomically, read back,
and listed in a manifest.

Everything here is blocking file and CPU work: `db.archive` runs it in a thread
(`asyncio.to_thread`), never on the event loop. Memory is bounded by the row group
(ROW_GROUP rows) and the chunk of COPY text being parsed, not by the partition.

Files are written under a temporary name in their own directory, fsynced, renamed into
place and the directory fsynced: a reader (or a crash) sees the whole file or none of it.
The manifest (ARCHIVE_DIR/manifest.json) is rewritten the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from db.tables import STREAMS, StreamTables

ROW_GROUP = 100_000  # rows per Parquet row group: what is held in memory at once
COMPRESSION = "zstd"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_US = pa.timestamp("us", tz="UTC")
_TIME_COLUMNS = ("ts", "received_at")  # sent by COPY as microseconds since the epoch


def schema_of(t: StreamTables) -> pa.Schema:
    """The history's columns, as Parquet keeps them: the device id, times in UTC to the
    microsecond, the values as float64 (PostgreSQL's float8)."""
    fields = [pa.field(t.id_column, pa.string(), nullable=False)]
    for column in t.columns[1:]:
        kind = _US if column in _TIME_COLUMNS else pa.float64()
        fields.append(pa.field(column, kind, nullable=False))
    return pa.schema(fields)


def energy_column(t: StreamTables) -> str:
    return "kwh_consumed_ac" if t.stream == "meter" else "kwh_delivered_dc"


def relative_path(stream: str, day: date) -> str:
    return f"{stream}/{day.isoformat()}.parquet"


@dataclass(frozen=True, slots=True)
class Figures:
    """What a day of a stream holds: compared between the partition and its file."""

    rows: int
    kwh: float
    first_ts: datetime | None
    last_ts: datetime | None


class PartWriter:
    """A Parquet file being written from chunks of COPY's CSV text (whole lines), under a
    temporary name until `publish`."""

    def __init__(self, path: Path, t: StreamTables) -> None:
        self.path = path
        self.stream = t
        self.schema = schema_of(t)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self._writer = pq.ParquetWriter(
                self.temp, self.schema, compression=COMPRESSION, write_statistics=True
            )
        except BaseException:  # (a full disk, say: nothing left behind)
            self.temp.unlink(missing_ok=True)
            raise
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0

    def add(self, csv_text: bytes) -> None:
        """Rows as COPY sent them (FORMAT csv, no header, whole lines)."""
        if not csv_text:
            return
        table = parse_csv(csv_text, self.stream, self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= ROW_GROUP:
            self._write(ROW_GROUP)

    def _write(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        self._writer.write_table(table.slice(0, rows), row_group_size=ROW_GROUP)
        rest = table.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self.rows += rows

    def finish(self) -> None:
        """The last rows written, the file closed and on disk (not yet in place)."""
        if self._pending_rows:
            self._write(self._pending_rows)
        self._writer.close()
        _fsync_file(self.temp)

    def publish(self) -> None:
        """Renamed into place, the rename itself made durable."""
        os.replace(self.temp, self.path)
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        self.temp.unlink(missing_ok=True)


def parse_csv(csv_text: bytes, t: StreamTables, schema: pa.Schema) -> pa.Table:
    """COPY's CSV (times as integer microseconds) as a table of the archive's schema.
    Doubles are read back exactly: PostgreSQL writes the shortest text that round-trips."""
    types = {f.name: pa.int64() if f.name in _TIME_COLUMNS else f.type for f in schema}
    table = pacsv.read_csv(
        io.BytesIO(csv_text),
        read_options=pacsv.ReadOptions(column_names=list(t.columns), use_threads=False),
        convert_options=pacsv.ConvertOptions(
            column_types=types, strings_can_be_null=False, quoted_strings_can_be_null=False
        ),
    )
    columns = [
        table[name].cast(_US) if name in _TIME_COLUMNS else table[name] for name in t.columns
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def read_back(path: Path, t: StreamTables) -> tuple[Figures, str, int]:
    """The file's figures as pyarrow reads them (row group by row group), its sha256 and
    its size."""
    column = energy_column(t)
    rows = 0
    sums: list[float] = []
    first: datetime | None = None
    last: datetime | None = None
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=ROW_GROUP, columns=["ts", column]):
        rows += batch.num_rows
        if not batch.num_rows:
            continue
        sums.append(pc.sum(batch.column(column)).as_py())
        low, high = pc.min_max(batch.column("ts")).values()
        first = low.as_py() if first is None else min(first, low.as_py())
        last = high.as_py() if last is None else max(last, high.as_py())
    kwh = math.fsum(sums)
    return Figures(rows, kwh, first, last), sha256_of(path), path.stat().st_size


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sums_agree(a: float, b: float) -> bool:
    """Two sums of the same values in another order: equal but for rounding (a relative
    1e-9, far below one reading's kWh at any realistic day's total)."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def manifest_entry(
    t: StreamTables, day: date, figures: Figures, sha256: str, size: int, partition: str
) -> dict[str, Any]:
    return {
        "stream": t.stream,
        "day": day.isoformat(),
        "partition": partition,
        "rows": figures.rows,
        "kwhColumn": energy_column(t),
        "kwh": figures.kwh,
        "firstTs": _iso(figures.first_ts),
        "lastTs": _iso(figures.last_ts),
        "sha256": sha256,
        "bytes": size,
        "archivedAt": _iso(datetime.now(UTC)),
    }


def record_in_manifest(archive_dir: Path, relative: str, entry: dict[str, Any]) -> None:
    """The file's entry added to (or replaced in) the manifest, rewritten atomically."""
    path = archive_dir / MANIFEST
    manifest = read_manifest(archive_dir)
    manifest["files"][relative] = entry
    manifest["files"] = dict(sorted(manifest["files"].items()))
    atomic_write(path, json.dumps(manifest, indent=2).encode() + b"\n")


def read_manifest(archive_dir: Path) -> dict[str, Any]:
    path = archive_dir / MANIFEST
    if not path.exists():
        return {"version": MANIFEST_VERSION, "files": {}}
    try:
        manifest = json.loads(path.read_bytes())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no object of files")
    except ValueError as error:  # (JSONDecodeError is one)
        raise ValueError(f"{path} is not an archive manifest ({error}): mend or move it") from None
    return manifest


def archived_entry(archive_dir: Path, relative: str) -> dict[str, Any] | None:
    """The manifest's entry for a file: the day was archived (and its partition dropped)."""
    entry: dict[str, Any] | None = read_manifest(archive_dir)["files"].get(relative)
    return entry


def atomic_write(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temp.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def stream_of(partition: str) -> tuple[StreamTables, str]:
    """The stream whose history a day partition belongs to, e.g. meter_readings_p20261101."""
    for t in STREAMS.values():
        if partition.startswith(f"{t.history}_p"):
            return t, t.history
    raise ValueError(f"{partition} is not a partition of a history table")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z") if moment else None
