"""What the write path passes around: a submission (the readings of one MQTT message or one
HTTP request, and the rejections to record with them), the outcome it is told after the
commit, and how a batch of submissions becomes the rows of one flush and is settled after it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

from daemon.metrics import Metrics
from daemon.readings import MeterReading, Reading, Stream, VehicleReading
from db.writes import FlushBatch, RejectionRow, Row, Stored

log = logging.getLogger(__name__)

# Stream names as plain str, looked up once rather than per reading (enum values are properties).
METER, VEHICLE = Stream.METER.value, Stream.VEHICLE.value


@dataclass(frozen=True, slots=True)
class Outcome:
    accepted: int
    duplicates: int
    refused_by_database: tuple[str, ...] = ()


@dataclass(slots=True)
class Submission:
    readings: Sequence[Reading]  # all of one stream
    rejections: Sequence[RejectionRow]
    on_committed: Callable[[Outcome], None]
    transport: str
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Set by a transport to recognise its own submissions later (MQTT: the connection).
    tag: object = None

    @property
    def weight(self) -> int:
        """What it counts for in the buffer: its readings, or 1 for rejections alone."""
        return max(1, len(self.readings))


class Overloaded(Exception):
    """The buffer is full: the caller should come back later (HTTP 503, MQTT: stop reading)."""


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


def batch_of(submissions: Sequence[Submission]) -> FlushBatch:
    batch = FlushBatch()
    for submission in submissions:
        for reading in submission.readings:
            stream, row = row_of(reading, submission.received_at)
            batch.rows[stream].append(row)
        batch.rejections.extend(submission.rejections)
    return batch


def settle(submissions: Sequence[Submission], stored: dict[str, Stored], metrics: Metrics) -> None:
    """Tell each submission how many of its readings were new and how many duplicates."""
    committed_at = datetime.now(UTC)
    counts: Counter[tuple[str, str, str]] = Counter()
    reading_lags: list[float] = []
    receive_lags: list[float] = []
    for submission in submissions:
        readings = submission.readings
        if not readings:
            notify(submission, Outcome(0, 0))
            continue
        # A submission holds the readings of one stream (one topic, one route).
        stream = readings[0].stream.value
        new = stored[stream]
        if new.keys is None:  # every row of the batch was new: no key to look up
            accepted = len(readings)
        else:
            accepted = sum(new.is_new((r.device_id, r.timestamp)) for r in readings)
        counts["accepted", stream, submission.transport] += accepted
        if accepted < len(readings):
            counts["duplicate", stream, submission.transport] += len(readings) - accepted
        # Once per message or request: its newest reading (a gateway's backlog array is old
        # by design) and its arrival.
        newest = readings[0].timestamp if len(readings) == 1 else max(r.timestamp for r in readings)
        reading_lags.append((committed_at - newest).total_seconds())
        receive_lags.append((committed_at - submission.received_at).total_seconds())
        notify(submission, Outcome(accepted, len(readings) - accepted))
    metrics.lag_seconds.observe_many("reading", reading_lags)
    metrics.lag_seconds.observe_many("receive", receive_lags)
    for (outcome, stream, transport), n in counts.items():
        metrics.readings.labels(outcome, stream, transport).inc(n)
    metrics.stored_rate.add(
        sum(n for (outcome, _, _), n in counts.items() if outcome == "accepted")
    )


def notify(submission: Submission, outcome: Outcome) -> None:
    try:
        submission.on_committed(outcome)
    except Exception:  # one caller's failing callback must not stop the flusher
        log.exception("on_committed callback failed")
