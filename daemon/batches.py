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

from daemon.metrics import Metrics
from daemon.readings import MeterReading, Reading, Stream, VehicleReading
from db.writes import FlushBatch, Key, RejectionRow, Row, Stored

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
    _conflicts: list[tuple[int, str]] = field(init=False, default_factory=list)
    _refused: list[tuple[int, str]] = field(init=False, default_factory=list)
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
        elif kind == CONFLICT:
            self._conflicts.append((position, reason))
        else:
            self._refused.append((position, reason))
        self._close_one()

    def records_written(self) -> None:
        """Its own rejection records are committed."""
        self._close_one()

    def _close_one(self) -> None:
        self._open -= 1
        if self._open == 0:
            self.settled = True
            outcome = Outcome(
                self._accepted,
                self._duplicates,
                tuple(sorted(self._conflicts)),
                tuple(sorted(self._refused)),
            )
            try:
                self.on_settled(outcome)
            except Exception:  # one caller's failing callback must not stop the flusher
                log.exception("on_settled callback failed")
        elif self._open < 0:
            raise AssertionError("a submission settled twice")


@dataclass(frozen=True, slots=True)
class Verdict:
    """A reading settled by a record: its conflict with what is stored, or its refusal."""

    position: int
    kind: str  # CONFLICT or REFUSED
    reason: str
    record: RejectionRow


@dataclass(frozen=True, slots=True, eq=False)
class Piece:
    """The part of a submission one transaction writes: some of its readings (`positions`;
    None for all), maybe its own rejection records, or verdicts."""

    submission: Submission
    positions: tuple[int, ...] | None = None
    own_records: bool = True
    verdicts: tuple[Verdict, ...] = ()

    @property
    def weight(self) -> int:
        """Readings it settles (0 for records alone)."""
        return self.reading_count + len(self.verdicts)

    @property
    def reading_count(self) -> int:
        if self.positions is None:
            return len(self.submission.readings)
        return len(self.positions)

    def readings(self) -> Iterator[tuple[int, Reading]]:
        readings = self.submission.readings
        if self.positions is None:
            yield from enumerate(readings)
        else:
            for position in self.positions:
                yield position, readings[position]

    def records(self) -> list[RejectionRow]:
        own = list(self.submission.rejections) if self.own_records else []
        return own + [v.record for v in self.verdicts]

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
    """The rows of one transaction (each (device, ts) once: the first in order), and where
    each reading of the pieces went."""

    rows: FlushBatch
    # Each reading of the pieces: (piece, position, stream, key, values, first occurrence?)
    placed: list[tuple[Piece, int, str, Key, tuple[Any, ...], bool]]


def batch_of(pieces: Sequence[Piece]) -> Batch:
    rows = FlushBatch()
    placed: list[tuple[Piece, int, str, Key, tuple[Any, ...], bool]] = []
    seen: set[tuple[str, Key]] = set()
    for piece in pieces:
        received_at = piece.submission.received_at
        for position, reading in piece.readings():
            stream, row = row_of(reading, received_at)
            key: Key = (row[0], row[1])
            first = (stream, key) not in seen
            if first:
                seen.add((stream, key))
                rows.rows[stream].append(row)
            placed.append((piece, position, stream, key, row[2:-1], first))
        rows.rejections.extend(piece.records())
    return Batch(rows, placed)


def settle(
    pieces: Sequence[Piece], batch: Batch, stored: dict[str, Stored], metrics: Metrics
) -> list[Piece]:
    """After the commit: each reading's outcome, each piece's records written. Returns the
    pieces still to write: a record for each conflict (the reading settles with it)."""
    committed_at = datetime.now(UTC)
    counts: Counter[tuple[str, str, str]] = Counter()
    follow_ups: list[Piece] = []
    firsts: dict[tuple[str, Key], tuple[Any, ...]] = {}
    for piece, position, stream, key, values, first in batch.placed:
        result = stored[stream]
        submission = piece.submission
        if first and result.is_new(key):
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
    _observe(pieces, committed_at, metrics)
    for piece in pieces:
        if piece.own_records and piece.submission.rejections:
            piece.submission.records_written()
        for verdict in piece.verdicts:
            piece.submission.resolve(verdict.kind, verdict.position, verdict.reason)
    for (kind, stream, transport), n in counts.items():
        metrics.readings.labels("accepted" if kind == STORED else kind, stream, transport).inc(n)
    metrics.stored_rate.add(sum(n for (kind, _, _), n in counts.items() if kind == STORED))
    return follow_ups


def _observe(pieces: Sequence[Piece], committed_at: datetime, metrics: Metrics) -> None:
    """The lags to commit, once per message or request: from its newest reading (a gateway's
    backlog array is old by design) and from its arrival."""
    reading_lags: list[float] = []
    receive_lags: list[float] = []
    for piece in pieces:
        readings = piece.submission.readings
        if not readings or piece.positions is not None:
            continue
        newest = readings[0].timestamp if len(readings) == 1 else max(r.timestamp for r in readings)
        reading_lags.append((committed_at - newest).total_seconds())
        receive_lags.append((committed_at - piece.submission.received_at).total_seconds())
    metrics.lag_seconds.observe_many("reading", reading_lags)
    metrics.lag_seconds.observe_many("receive", receive_lags)


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
    verdict = Verdict(position, CONFLICT, reason, record_of(submission, reading, reason))
    return Piece(submission, (), False, (verdict,))


def refusal_piece(piece: Piece, position: int, detail: str) -> Piece:
    """The record of a reading PostgreSQL refused (a value only it checks)."""
    submission = piece.submission
    reading = submission.readings[position]
    reason = f"refused by the database: {detail}"
    verdict = Verdict(position, REFUSED, detail, record_of(submission, reading, reason))
    return Piece(submission, (), False, (verdict,))


def record_of(submission: Submission, reading: Reading, reason: str) -> RejectionRow:
    return RejectionRow(
        received_at=submission.received_at,
        source=submission.transport,
        topic_or_route=submission.origin or "(database)",
        payload=orjson.dumps(reading.model_dump(mode="json", by_alias=True)).decode(),
        reason=reason,
    )


def _value_tuple(reading: Reading) -> tuple[Any, ...]:
    return row_of(reading, reading.timestamp)[1][2:-1]


def _values_text(reading: Reading, values: tuple[Any, ...]) -> str:
    names = (
        ("kwhConsumedAc", "voltage")
        if type(reading) is MeterReading
        else ("soc", "kwhDeliveredDc", "batteryTemp")
    )
    return ", ".join(f"{name} {value!r}" for name, value in zip(names, values, strict=False))
