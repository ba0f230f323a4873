"""The write path that MQTT and HTTP share: a bounded buffer and the transactional flusher.

Submissions (the readings of one MQTT message or one HTTP request, plus any rejections to
record) wait in the buffer until it holds `flush_max_readings` or `flush_interval` has passed
since the oldest one arrived; then they are written in one transaction. A submission's
`on_committed` runs only after that transaction has committed: that is where MQTT sends its
PUBACK and HTTP answers 201, so nothing is acknowledged that a crash could still lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import asyncpg

from daemon.metrics import Metrics
from daemon.readings import MeterReading, Reading, Stream, VehicleReading
from db.errors import DatabaseFailure, DataFailure, classify
from db.writes import FlushBatch, RejectionRow, Row, Stored, flush_batch

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
# Stream names as plain str, looked up once rather than per reading (enum values are properties).
METER, VEHICLE = Stream.METER.value, Stream.VEHICLE.value
WATCHDOG_TICK_S = 0.1  # how late, at most, a caller hears that its commit timed out


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
            _notify(submission, Outcome(0, 0))
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
        _notify(submission, Outcome(accepted, len(readings) - accepted))
    metrics.lag_seconds.observe_many("reading", reading_lags)
    metrics.lag_seconds.observe_many("receive", receive_lags)
    for (outcome, stream, transport), n in counts.items():
        metrics.readings.labels(outcome, stream, transport).inc(n)


def _notify(submission: Submission, outcome: Outcome) -> None:
    try:
        submission.on_committed(outcome)
    except Exception:  # one caller's failing callback must not stop the flusher
        log.exception("on_committed callback failed")


class Writer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        flush_max_readings: int,
        flush_interval_s: float,
        buffer_max_readings: int,
        flush_concurrency: int = 2,
        metrics: Metrics | None = None,
    ) -> None:
        self._pool = pool
        self._flush_max = flush_max_readings
        self._interval_s = flush_interval_s
        self._buffer_max = buffer_max_readings
        self._pending: deque[Submission] = deque()
        self._pending_readings = 0
        self._inflight_readings = 0
        self._slots = asyncio.Semaphore(flush_concurrency)
        self._flushes: set[asyncio.Task[None]] = set()
        self._oldest_at = 0.0
        self._work = asyncio.Event()
        self._enough = asyncio.Event()
        self._stopping = False
        # Optimistic until a flush fails: HTTP answers 503 at once while this is False.
        self.database_ok = True
        self.metrics = metrics or Metrics()
        self.metrics.buffer_depth.set_function(lambda: self.depth)
        self.room_listeners: list[Callable[[], None]] = []
        # HTTP callers waiting for their commit: (deadline, sequence, future, timeout).
        self._deadlines: list[tuple[float, int, asyncio.Future[Outcome], float]] = []
        self._seq = 0
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Readings held in memory: waiting plus being written."""
        return self._pending_readings + self._inflight_readings

    @property
    def full(self) -> bool:
        return self.depth >= self._buffer_max

    def submit(self, submission: Submission) -> None:
        """Queue a submission; `on_committed` runs after the transaction holding it commits."""
        if self._stopping:
            raise Overloaded("the daemon is shutting down")
        if not self._pending:
            self._oldest_at = time.monotonic()
        self._pending.append(submission)
        self._pending_readings += submission.weight
        self._work.set()
        if self._pending_readings >= self._flush_max:
            self._enough.set()

    def drop_pending(self, stale: Callable[[Submission], bool]) -> int:
        """Forget waiting submissions that will come again (unacked MQTT after a reconnect)."""
        kept = deque(s for s in self._pending if not stale(s))
        dropped = len(self._pending) - len(kept)
        self._pending = kept
        self._pending_readings = sum(s.weight for s in kept)
        return dropped

    async def write(
        self,
        readings: Sequence[Reading],
        rejections: Sequence[RejectionRow],
        *,
        transport: str,
        timeout_s: float | None = None,
    ) -> Outcome:
        """Submit and wait for the commit (HTTP).

        Raises Overloaded at once when the buffer is full or the database is known to be
        down, and when the commit takes longer than `timeout_s`: a caller is never left
        hanging. What was submitted stays in the buffer and is still written; a retry is a
        duplicate, and duplicates are absorbed.
        """
        if self.full:
            raise Overloaded(f"the buffer holds {self.depth} readings")
        if not self.database_ok:
            raise Overloaded("the database is unreachable")
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.submit(Submission(readings, rejections, lambda o: _resolve(done, o), transport))
        if timeout_s is not None:
            self._expire_after(done, timeout_s)
        return await done

    def _expire_after(self, done: asyncio.Future[Outcome], timeout_s: float) -> None:
        """Fail `done` with Overloaded if no commit resolved it within `timeout_s`.

        One watchdog for every waiting caller, not a timer each: a timer per request
        (`asyncio.timeout`) cost about a tenth of the event loop under load (BENCHMARKS.md).
        """
        self._seq += 1
        heapq.heappush(self._deadlines, (time.monotonic() + timeout_s, self._seq, done, timeout_s))
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._expire_waits(), name="writer-watchdog")

    async def _expire_waits(self) -> None:
        deadlines = self._deadlines
        while deadlines:
            now = time.monotonic()
            while deadlines and (deadlines[0][2].done() or deadlines[0][0] <= now):
                _, _, done, timeout_s = heapq.heappop(deadlines)
                if not done.done():
                    done.set_exception(Overloaded(f"no commit within {timeout_s} s"))
            if deadlines:
                await asyncio.sleep(min(WATCHDOG_TICK_S, max(0.0, deadlines[0][0] - now)))

    async def run(self) -> None:
        """Flush until stopped; on stop, flush what is left (while the database answers)."""
        while True:
            if not self._pending:
                if self._stopping:
                    if self._flushes:
                        await asyncio.wait(set(self._flushes))
                    return
                self._work.clear()
                await self._work.wait()
                continue
            await self._wait_for_batch()
            # Up to `flush_concurrency` transactions at once, on as many connections: while
            # PostgreSQL commits one batch, the next is being gathered and sent.
            await self._slots.acquire()
            if not self._pending:
                self._slots.release()
                continue
            flush = asyncio.create_task(self._flush(self._take()))
            self._flushes.add(flush)
            flush.add_done_callback(self._flush_done)

    def _flush_done(self, flush: asyncio.Task[None]) -> None:
        self._flushes.discard(flush)
        self._slots.release()

    def stop(self) -> None:
        self._stopping = True
        self._work.set()
        self._enough.set()

    async def _wait_for_batch(self) -> None:
        remaining = self._oldest_at + self._interval_s - time.monotonic()
        if self._pending_readings >= self._flush_max or remaining <= 0 or self._stopping:
            return
        self._enough.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._enough.wait(), remaining)

    def _take(self) -> list[Submission]:
        taken: list[Submission] = []
        count = 0
        while self._pending and (
            not taken or count + len(self._pending[0].readings) <= self._flush_max
        ):
            submission = self._pending.popleft()
            taken.append(submission)
            count += submission.weight
        self._pending_readings -= count
        self._inflight_readings += count
        if self._pending:
            self._oldest_at = time.monotonic()
        return taken

    async def _flush(self, submissions: list[Submission]) -> None:
        try:
            await self._commit(submissions)
        finally:
            self._inflight_readings -= sum(s.weight for s in submissions)
            if not self.full:
                for listener in self.room_listeners:
                    listener()

    async def _commit(self, submissions: list[Submission]) -> None:
        """Commit with back-off while the database is away; isolate rows it refuses."""
        backoff = BACKOFF_FIRST_S
        while True:
            try:
                inserted = await self._transaction(batch_of(submissions))
            except DataFailure as failure:
                await self._isolate(submissions, failure)
                return
            except DatabaseFailure as failure:
                self._set_database_ok(False)
                self.metrics.flush_failures.inc()
                log.warning(
                    "flush of %d submissions failed, retrying in %.1f s: %s",
                    len(submissions),
                    backoff,
                    failure.detail,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            self._set_database_ok(True)
            settle(submissions, inserted, self.metrics)
            return

    def _set_database_ok(self, ok: bool) -> None:
        self.database_ok = ok
        self.metrics.database_up.set(1 if ok else 0)

    async def _transaction(self, batch: FlushBatch) -> dict[str, Stored]:
        started = time.perf_counter()
        try:
            async with self._pool.acquire() as conn:
                inserted = await flush_batch(conn, batch)
        except Exception as error:
            raise classify(error) from error
        self.metrics.flush_seconds.observe(time.perf_counter() - started)
        self.metrics.last_commit.set(time.time())
        self.metrics.flush_size.observe(sum(len(rows) for rows in batch.rows.values()))
        return inserted

    async def _isolate(self, submissions: list[Submission], failure: DataFailure) -> None:
        """The database refused a row: split until the refused readings stand alone."""
        if len(submissions) > 1:
            middle = len(submissions) // 2
            await self._commit(submissions[:middle])
            await self._commit(submissions[middle:])
            return
        submission = submissions[0]
        if len(submission.readings) > 1 or (submission.readings and submission.rejections):
            await self._commit_one_by_one(submission)
        else:
            await self._refuse(submission, failure)

    async def _commit_one_by_one(self, submission: Submission) -> None:
        outcomes: list[Outcome] = []
        for reading in submission.readings:
            single = Submission(
                [reading], [], outcomes.append, submission.transport, submission.received_at
            )
            await self._commit([single])
        rejections = Submission(
            [], submission.rejections, outcomes.append, submission.transport, submission.received_at
        )
        if submission.rejections:
            await self._commit([rejections])
        _notify(
            submission,
            Outcome(
                accepted=sum(o.accepted for o in outcomes),
                duplicates=sum(o.duplicates for o in outcomes),
                refused_by_database=tuple(r for o in outcomes for r in o.refused_by_database),
            ),
        )

    async def _refuse(self, submission: Submission, failure: DataFailure) -> None:
        """A single reading the database refused: record why, keep everything else."""
        log.warning("database refused a row from %s: %s", submission.transport, failure.detail)
        if submission.readings:
            rows = [row_of(r, submission.received_at)[1] for r in submission.readings]
            refusal = RejectionRow(
                received_at=submission.received_at,
                source=submission.transport,
                topic_or_route="(database)",
                payload=repr(rows)[:2048],
                reason=f"refused by the database: {failure.detail}",
            )
            await self._commit([Submission([], [refusal], _ignore, submission.transport)])
        _notify(submission, Outcome(0, 0, refused_by_database=(failure.detail,)))


def _resolve(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():
        future.set_result(outcome)


def _ignore(_: Outcome) -> None:
    return None
