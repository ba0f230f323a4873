"""What the write path passes around, and the rule it keeps by construction:

- a **submission**: the readings of one MQTT message or one HTTP request, the rejection
  records to write with them, and whom to tell when it is settled;
- a **piece**: the part of one submission that one transaction writes: all of it in the
  common case; half of it, or one reading, when PostgreSQL refused the whole and the writer
  is looking for what it refuses; or a record that settles one reading (its refusal by the
  database, or its conflict with what is stored);
- its **outcome**, told once.

A submission is settled exactly once, and only when every one of its readings has its final
outcome, each committed: **stored**; a **duplicate** of what is stored (the same values);
a **conflict** with what is stored (other values at the same device and moment: the first
stored stands, and the conflict is recorded with both values); or **refused** by the
database (recorded with its reason); and when its own rejection records are written. Until
then it is open: MQTT sends no PUBACK, HTTP no 201. A reading the database holds back keeps
its whole submission open; nothing in the writer can settle it any other way.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import orjson

from db.tables import STREAMS
from db.writes import FlushBatch, Key, RejectionRow, Row, Stored
from ingest.metrics import Metrics
from ingest.readings import (
    JSON_NAMES,
    LISTED_REJECTIONS,
    MeterReading,
    Reading,
    Stream,
    VehicleReading,
)

log = logging.getLogger(__name__)

# Stream names as plain str, looked up once rather than per reading (enum values are properties).
METER, VEHICLE = Stream.METER.value, Stream.VEHICLE.value
STORED, DUPLICATE, CONFLICT, REFUSED = "stored", "duplicate", "conflict", "refused"


@dataclass(frozen=True, slots=True)
class Outcome:
    accepted: int
    duplicates: int
    conflicts: tuple[tuple[int, str], ...] = ()  # (the reading's position, why)
    refused: tuple[tuple[int, str], ...] = ()  # refused by the database: (position, why)

    @property
    def refused_by_database(self) -> tuple[str, ...]:
        return tuple(reason for _, reason in self.refused)


class Overloaded(Exception):
    """The buffer is full: the caller should come back later (HTTP 503, MQTT: stop reading)."""


@dataclass(slots=True, eq=False)
class Submission:
    readings: Sequence[Reading]  # all of one stream
    rejections: Sequence[RejectionRow]
    on_settled: Callable[[Outcome], None]
    transport: str
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Set by a transport to recognise its own submissions later (MQTT: the connection).
    tag: object = None
    origin: str = ""  # the topic or the route: where a conflict or a refusal is recorded from
    # Its ledger: readings (and its own records, as one) without a final outcome yet.
    _open: int = field(init=False)
    _accepted: int = field(init=False, default=0)
    _duplicates: int = field(init=False, default=0)
    _verdicts: list[tuple[str, int, str]] | None = field(init=False, default=None)
    conflicts_recorded: int = field(init=False, default=0)  # (at most CONFLICT_RECORDS)
    settled: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._open = len(self.readings) + (1 if self.rejections or not self.readings else 0)

    @property
    def weight(self) -> int:
        """What it counts for in the buffer of readings (records alone count apart)."""
        return len(self.readings)

    def resolve(self, kind: str, position: int, reason: str = "") -> None:
        """One reading's final outcome, committed."""
        if kind == STORED:
            self._accepted += 1
        elif kind == DUPLICATE:
            self._duplicates += 1
        else:  # CONFLICT or REFUSED, with why
            if self._verdicts is None:
                self._verdicts = []
            self._verdicts.append((kind, position, reason))
        self._close(1)

    def resolve_stored(self, count: int) -> None:
        """`count` readings stored, committed (the common case: one call a submission)."""
        self._accepted += count
        self._close(count)

    def records_written(self) -> None:
        """Its own rejection records are committed."""
        self._close(1)

    def _close(self, count: int) -> None:
        self._open -= count
        if self._open > 0:
            return
        if self._open < 0 or self.settled:
            raise AssertionError("a submission settled twice")
        self.settled = True
        if self._verdicts is None:
            outcome = Outcome(self._accepted, self._duplicates)
        else:
            verdicts = sorted(self._verdicts)
            outcome = Outcome(
                self._accepted,
                self._duplicates,
                tuple((p, r) for kind, p, r in verdicts if kind == CONFLICT),
                tuple((p, r) for kind, p, r in verdicts if kind == REFUSED),
            )
        try:
            self.on_settled(outcome)
        except Exception:  # one caller's failing callback must not stop the flusher
            log.exception("on_settled callback failed")


@dataclass(frozen=True, slots=True)
class Verdict:
    """A reading settled by a record: its conflict with what is stored, or its refusal."""

    position: int
    kind: str  # CONFLICT or REFUSED
    reason: str
    record: RejectionRow | None  # (None: a conflict past the ones recorded for its submission)


class Piece:
    """The part of a submission one transaction writes: some of its readings (`positions`;
    None for all), maybe its own rejection records, or verdicts."""

    __slots__ = ("own_records", "positions", "reading_count", "submission", "verdicts", "weight")

    def __init__(
        self,
        submission: Submission,
        positions: tuple[int, ...] | None = None,
        own_records: bool = True,
        verdicts: tuple[Verdict, ...] = (),
    ) -> None:
        self.submission = submission
        self.positions = positions
        self.own_records = own_records
        self.verdicts = verdicts
        self.reading_count = len(submission.readings) if positions is None else len(positions)
        # Readings it settles (0 for records alone): what it counts for in the buffer.
        self.weight = self.reading_count + len(verdicts)

    def readings(self) -> Iterator[tuple[int, Reading]]:
        readings = self.submission.readings
        if self.positions is None:
            yield from enumerate(readings)
        else:
            for position in self.positions:
                yield position, readings[position]

    def records(self) -> list[RejectionRow]:
        own = list(self.submission.rejections) if self.own_records else []
        if not self.verdicts:
            return own
        return own + [v.record for v in self.verdicts if v.record is not None]

    def units(self) -> int:
        """Outcomes it can settle: its readings, its own records (one), its verdicts."""
        own = 1 if self.own_records and self.submission.rejections else 0
        return self.reading_count + own + len(self.verdicts)

    def halves(self) -> tuple[Piece, Piece]:
        """Two pieces settling what this one does (for a piece of more than one unit)."""
        positions = [p for p, _ in self.readings()]
        verdicts = self.verdicts
        if len(positions) > 1:
            middle = len(positions) // 2
            return (
                Piece(self.submission, tuple(positions[:middle]), self.own_records, verdicts),
                Piece(self.submission, tuple(positions[middle:]), False, ()),
            )
        if positions:  # one reading, and records: apart
            return (
                Piece(self.submission, tuple(positions), False, ()),
                Piece(self.submission, (), self.own_records, verdicts),
            )
        own = self.own_records and bool(self.submission.rejections)
        if own:  # its own records, and verdicts: apart
            return (
                Piece(self.submission, (), True, ()),
                Piece(self.submission, (), False, verdicts),
            )
        middle = len(verdicts) // 2
        return (
            Piece(self.submission, (), False, verdicts[:middle]),
            Piece(self.submission, (), False, verdicts[middle:]),
        )


def whole(submission: Submission) -> Piece:
    return Piece(submission)


def row_of(reading: Reading, received_at: datetime) -> tuple[str, Row]:
    # (`type() is`, not isinstance: pydantic models' metaclass makes isinstance slow.)
    if type(reading) is MeterReading:
        return METER, (
            reading.meter_id,
            reading.timestamp,
            reading.kwh_consumed_ac,
            reading.voltage,
            received_at,
        )
    vehicle = cast(VehicleReading, reading)
    return VEHICLE, (
        vehicle.vehicle_id,
        vehicle.timestamp,
        vehicle.soc,
        vehicle.kwh_delivered_dc,
        vehicle.battery_temp,
        received_at,
    )


@dataclass(slots=True)
class Batch:
    """The rows of one transaction, in the order of the pieces: a (device, ts) twice in it is
    stored once, the first in order (the history's insert skips the later one)."""

    rows: FlushBatch
    pieces: Sequence[Piece]


def batch_of(pieces: Sequence[Piece]) -> Batch:
    rows = FlushBatch()
    kept = rows.rows
    for piece in pieces:
        submission = piece.submission
        received_at = submission.received_at
        readings = submission.readings
        if piece.positions is not None:
            readings = [readings[p] for p in piece.positions]
        for reading in readings:
            stream, row = row_of(reading, received_at)
            kept[stream].append(row)
        if piece.verdicts or (piece.own_records and submission.rejections):
            rows.rejections.extend(piece.records())
    return Batch(rows, pieces)


def settle(batch: Batch, stored: dict[str, Stored], metrics: Metrics) -> list[Piece]:
    """After the commit: each reading's outcome, each piece's records written. Returns the
    pieces still to write: a record for each conflict (the reading settles with it)."""
    committed_at = datetime.now(UTC)
    counts: Counter[tuple[str, str, str]] = Counter()
    follow_ups: list[Piece] = []
    pieces = batch.pieces
    # (Every row stored means no (device, ts) came twice either.)
    all_new = all(r.keys is None for r in stored.values())
    if not all_new:
        follow_ups = _classify(pieces, stored, counts)
    reading_lags: list[float] = []
    receive_lags: list[float] = []
    for piece in pieces:
        submission = piece.submission
        readings = submission.readings
        n = piece.reading_count
        if all_new and n:  # every reading new (the common case): one count a piece
            stream = METER if type(readings[0]) is MeterReading else VEHICLE
            counts[STORED, stream, submission.transport] += n
            submission.resolve_stored(n)
        if n and piece.positions is None:  # the lags, once per message or request
            newest = readings[0].timestamp if n == 1 else max(r.timestamp for r in readings)
            reading_lags.append((committed_at - newest).total_seconds())
            receive_lags.append((committed_at - submission.received_at).total_seconds())
        if piece.own_records and submission.rejections:
            submission.records_written()
        for verdict in piece.verdicts:
            submission.resolve(verdict.kind, verdict.position, verdict.reason)
    # (From its newest reading: a gateway's backlog array is old by design.)
    metrics.lag_seconds.observe_many("reading", reading_lags)
    metrics.lag_seconds.observe_many("receive", receive_lags)
    for (kind, stream, transport), count in counts.items():
        metrics.readings.labels("accepted" if kind == STORED else kind, stream, transport).inc(
            count
        )
    metrics.stored_rate.add(sum(c for (kind, _, _), c in counts.items() if kind == STORED))
    return follow_ups


def _classify(
    pieces: Sequence[Piece], stored: dict[str, Stored], counts: Counter[tuple[str, str, str]]
) -> list[Piece]:
    """Reading by reading: stored (the first of its key in the batch, stored now), else a
    duplicate or a conflict of what is stored (stored now by a reading before it in the
    batch, or stored before)."""
    follow_ups: list[Piece] = []
    firsts: dict[tuple[str, Key], tuple[Any, ...]] = {}
    for piece in pieces:
        submission = piece.submission
        for position, reading in piece.readings():
            stream, row = row_of(reading, submission.received_at)
            key: Key = (row[0], row[1])
            values = row[2:-1]
            result = stored[stream]
            if (stream, key) not in firsts and result.is_new(key):
                firsts[(stream, key)] = values
                kind = STORED
            else:
                reference = firsts.get((stream, key), result.before.get(key))
                kind = DUPLICATE if reference is None or reference == values else CONFLICT
            counts[kind, stream, submission.transport] += 1
            if kind == CONFLICT:
                follow_ups.append(conflict_piece(piece, position, reference or ()))
            else:
                submission.resolve(kind, position)
    return follow_ups


def conflict_piece(piece: Piece, position: int, stored_values: tuple[Any, ...]) -> Piece:
    """The record of a reading that met other values at its device and moment."""
    submission = piece.submission
    reading = submission.readings[position]
    mine = _values_text(reading, _value_tuple(reading))
    theirs = _values_text(reading, stored_values)
    reason = (
        f"conflict: {reading.stream.value} {reading.device_id!r} at "
        f"{reading.timestamp.isoformat()} is already stored with {theirs}; this reading has "
        f"{mine} (the first stored stands)"
    )
    # A record for each of the first CONFLICT_RECORDS conflicts of a message or request, not
    # one for each of its readings: 10,000 conflicting readings a request would otherwise
    # push every other record out of the bounded table within seconds.
    record = None
    if submission.conflicts_recorded < CONFLICT_RECORDS:
        submission.conflicts_recorded += 1
        last = submission.conflicts_recorded == CONFLICT_RECORDS
        record = record_of(submission, reading, reason + (MORE_CONFLICTS if last else ""))
    verdict = Verdict(position, CONFLICT, reason, record)
    return Piece(submission, (), False, (verdict,))


CONFLICT_RECORDS = LISTED_REJECTIONS
MORE_CONFLICTS = (
    f" [the first {CONFLICT_RECORDS} conflicts of a message or request are recorded; any "
    f'further ones are counted in energy_ingest_readings_total{{outcome="conflict"}}, and an '
    f"HTTP answer lists them all]"
)


def refusal_piece(piece: Piece, position: int, detail: str) -> Piece:
    """The record of a reading PostgreSQL refused (a value only it checks)."""
    submission = piece.submission
    reading = submission.readings[position]
    reason = f"refused by the database: {detail}"
    verdict = Verdict(position, REFUSED, detail, record_of(submission, reading, reason))
    return Piece(submission, (), False, (verdict,))


def record_of(submission: Submission, reading: Reading, reason: str) -> RejectionRow:
    return RejectionRow.of(
        orjson.dumps(reading.model_dump(mode="json", by_alias=True)),
        reason,
        received_at=submission.received_at,
        source=submission.transport,
        origin=submission.origin or "(database)",
    )


def _value_tuple(reading: Reading) -> tuple[Any, ...]:
    return row_of(reading, reading.timestamp)[1][2:-1]


def _values_text(reading: Reading, values: tuple[Any, ...]) -> str:
    columns = STREAMS[METER if type(reading) is MeterReading else VEHICLE].value_columns
    names = [JSON_NAMES[column] for column in columns]
    return ", ".join(f"{name} {value!r}" for name, value in zip(names, values, strict=False))
