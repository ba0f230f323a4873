"""The writer's rule, by construction (`ingest.batches`): a message or a request is settled
exactly once, and only when each of its readings has its final outcome, committed: stored,
a duplicate, a conflict (recorded with both values), or refused by the database (recorded
with its reason).

A stateful property test (hypothesis' RuleBasedStateMachine) drives the writer through its
flush seam against a database of its own, in memory, whose faults it chooses step by step:
rows whose values only the database refuses (a reading's fault), the database away (for
now), rows it cannot place (until mended, as a missing partition), and exceptions of our
own, in any order and any overlap, with readings colliding on their device and moment.
Invariants, after every step:

- nothing is settled before every one of its readings is committed;
- every reading ends stored once, or recorded with its reason, never both;
- a held reading is retried until it is stored (once the faults are mended, everything
  settles);
- memory stays bounded: what the writer holds is what is not settled yet.
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import ingest.batches as batches
from db.errors import DataFailure, PersistentFailure, TransientFailure
from db.writes import FlushBatch, Key, RejectionRow, Stored
from ingest.batches import Outcome, Submission
from ingest.flushing import Timing
from ingest.readings import MeterReading
from ingest.writer import Writer

FAST = Timing(
    backoff_first_s=0.001, backoff_max_s=0.004, held_retry_first_s=0.002, held_retry_max_s=0.008
)
BASE = datetime(2026, 11, 1, tzinfo=UTC)
METERS = ("M-1", "M-2", "M-3")
MOMENTS = 6
KWH = (0.5, 1.5)  # few values: copies of a reading, and other readings at its moment
BAD_VOLTAGE = 999.0  # a value only the database refuses (a CHECK it alone knows)


class MemoryDatabase:
    """The flush seam's other side: all or nothing per batch, faults chosen by the test."""

    def __init__(self) -> None:
        self.history: dict[Key, tuple[Any, ...]] = {}
        self.records: list[RejectionRow] = []
        self.away = False  # TransientFailure for every batch
        self.unplaceable: set[Key] = set()  # PersistentFailure while a batch holds one
        self.bugs = 0  # the next N batches raise an exception of ours
        self.commits = 0

    async def flush(self, batch: FlushBatch) -> dict[str, Stored]:
        await asyncio.sleep(0)
        if self.away:
            raise TransientFailure("08006 ConnectionDoesNotExistError: lost", sqlstate="08006")
        if self.bugs:
            self.bugs -= 1
            raise KeyError("an error of ours")
        rows = batch.rows["meter"]
        for row in rows:
            if row[3] == BAD_VOLTAGE:
                raise DataFailure("23514 CheckViolationError: voltage_check", sqlstate="23514")
            if (row[0], row[1]) in self.unplaceable:
                raise PersistentFailure("23514 no partition of relation", sqlstate="23514")
        new: set[Key] = set()
        before: dict[Key, tuple[Any, ...]] = {}
        for row in rows:  # (as PostgreSQL: a key twice in a batch, the first stored)
            key = (row[0], row[1])
            if key in new:
                continue
            if key in self.history:
                before[key] = self.history[key]  # what the statement's snapshot saw
            else:
                self.history[key] = row[2:-1]
                new.add(key)
        self.records.extend(batch.rejections)
        self.commits += 1
        stored = Stored(None if len(new) == len(rows) else new, before)
        return {"meter": stored, "vehicle": Stored()}


def reading(meter: int, moment: int, kwh: int, bad: bool) -> MeterReading:
    return MeterReading.model_construct(
        meter_id=METERS[meter],
        kwh_consumed_ac=KWH[kwh],
        voltage=BAD_VOLTAGE if bad else 230.0,
        timestamp=BASE + timedelta(minutes=moment),
    )


class WriterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # One conflict of a submission recorded, the rest only counted (20 in the daemon).
        self.conflict_records, batches.CONFLICT_RECORDS = batches.CONFLICT_RECORDS, 1
        self.loop = asyncio.new_event_loop()
        self.db = MemoryDatabase()
        self.writer = Writer(
            self.db.flush,
            flush_max_readings=4,
            flush_interval_s=0.001,
            buffer_max_readings=10_000,
            flush_concurrency=2,
            timing=FAST,
        )
        self.task = self.loop.create_task(self.writer.run())
        self.submitted: list[Submission] = []
        self.settled: dict[int, Outcome] = {}
        self.broken: list[AssertionError] = []
        self.serial = itertools.count()

    # -- what happens ------------------------------------------------------------------------

    @rule(
        content=st.lists(
            st.tuples(
                st.integers(0, len(METERS) - 1),
                st.integers(0, MOMENTS - 1),
                st.integers(0, len(KWH) - 1),
                st.integers(0, 9).map(lambda n: n == 0),  # one in ten refused by the database
            ),
            max_size=6,
        ),
        with_record=st.booleans(),
    )
    def submit(self, content: list[tuple[int, int, int, bool]], with_record: bool) -> None:
        if not content and not with_record:
            return
        n = next(self.serial)
        records = [self.record(f"invalid input of message {n}")] if with_record else []

        def settled(outcome: Outcome) -> None:
            self.on_settled(n, outcome)

        submission = Submission(
            [reading(*item) for item in content],
            records,
            settled,
            "mqtt",
            origin=f"meters/m/telemetry#{n}",
        )
        self.submitted.append(submission)
        self.writer.submit(submission)

    @rule(steps=st.integers(1, 30))
    def run(self, steps: int) -> None:
        self.loop.run_until_complete(asyncio.sleep(0.001 * steps))

    @rule()
    def database_away(self) -> None:
        self.db.away = True

    @rule()
    def database_back(self) -> None:
        self.db.away = False

    @rule(meter=st.integers(0, len(METERS) - 1), moment=st.integers(0, MOMENTS - 1))
    def partition_missing(self, meter: int, moment: int) -> None:
        self.db.unplaceable.add((METERS[meter], BASE + timedelta(minutes=moment)))

    @rule()
    def partitions_mended(self) -> None:
        self.db.unplaceable.clear()

    @rule(count=st.integers(1, 3))
    def errors_of_ours(self, count: int) -> None:
        self.db.bugs += count

    # -- what must hold ------------------------------------------------------------------------

    def record(self, reason: str) -> RejectionRow:
        return RejectionRow(BASE, "mqtt", "meters/m/telemetry", "{}", reason)

    def on_settled(self, n: int, outcome: Outcome) -> None:
        # (The writer logs and swallows a failing callback's exception, as it must for a
        # caller's: what this one finds is kept, and failed by an invariant.)
        try:
            assert n not in self.settled, f"submission {n} settled twice"
            self.settled[n] = outcome
            self.assert_committed(self.submitted[n], outcome)
        except AssertionError as error:
            self.broken.append(error)
            raise

    @invariant()
    def every_settlement_kept_the_rules(self) -> None:
        assert not self.broken, self.broken[0]

    def assert_committed(self, submission: Submission, outcome: Outcome) -> None:
        """At its settlement, everything a submission's outcome says is in the database."""
        db = self.db
        reasons = {record.reason for record in db.records}
        for own in submission.rejections:
            assert own.reason in reasons, "settled before its own record was written"
        conflicts = dict(outcome.conflicts)
        refused = dict(outcome.refused)
        for position, r in enumerate(submission.readings):
            assert isinstance(r, MeterReading)
            key = (r.meter_id, r.timestamp)
            values = (r.kwh_consumed_ac, r.voltage)
            if position in refused:
                assert r.voltage == BAD_VOLTAGE
                assert any("refused by the database" in x for x in reasons)
                assert db.history.get(key) != values, "refused, and stored"
            elif position in conflicts:
                assert key in db.history and db.history[key] != values
            else:
                assert db.history.get(key) == values, "settled before its reading was stored"
        # Its conflicts recorded before it settles: CONFLICT_RECORDS of them at most.
        recorded = [
            record.reason
            for record in db.records
            if record.topic_or_route == submission.origin and record.reason.startswith("conflict")
        ]
        assert len(recorded) == min(len(conflicts), batches.CONFLICT_RECORDS), recorded
        assert all(any(x.startswith(r) for r in conflicts.values()) for x in recorded)
        kinds = outcome.accepted + outcome.duplicates + len(conflicts) + len(refused)
        assert kinds == len(submission.readings)

    @invariant()
    def nothing_unsettled_is_forgotten(self) -> None:
        open_readings = sum(
            len(s.readings) for n, s in enumerate(self.submitted) if n not in self.settled
        )
        # What the writer holds (waiting, in flight, held back, with their verdicts) is at
        # most what is not settled yet: bounded by it, nothing kept for nothing.
        assert self.writer.depth <= open_readings + len(self.submitted), (
            self.writer.depth,
            open_readings,
        )
        stored_values = list(self.db.history)
        assert len(stored_values) == len(set(stored_values))

    @invariant()
    def never_both_stored_and_refused(self) -> None:
        for key, values in self.db.history.items():
            assert values[1] != BAD_VOLTAGE, (key, values)

    def teardown(self) -> None:
        """Faults mended: every submission settles (held ones retried until stored)."""
        try:
            self.db.away = False
            self.db.unplaceable.clear()
            self.db.bugs = 0
            self.writer.retry_held_now()
            deadline = self.loop.time() + 10
            while len(self.settled) < len(self.submitted) and self.loop.time() < deadline:
                self.loop.run_until_complete(asyncio.sleep(0.005))
                self.writer.retry_held_now()
            unsettled = [n for n in range(len(self.submitted)) if n not in self.settled]
            assert not unsettled, (unsettled, self.writer.depth, len(self.writer.flusher.held))
            assert self.writer.depth == 0 and not self.writer.flusher.held
        finally:
            batches.CONFLICT_RECORDS = self.conflict_records
            self.writer.stop()
            self.loop.run_until_complete(asyncio.wait_for(self.task, 10))
            self.loop.close()


WriterMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestWriterKeepsItsRule = WriterMachine.TestCase
