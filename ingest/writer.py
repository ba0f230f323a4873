"""The write path that MQTT and HTTP share: a bounded buffer, and the flusher in front of it.

Submissions wait in the buffer until it holds `flush_max_readings` or `flush_interval` has
passed since the oldest one arrived; then they are written in one transaction (up to
`flush_concurrency` at once, each on its own connection of the write pool). A submission is
settled (`on_settled`: MQTT sends its PUBACK, HTTP answers 201) only once every one of its
readings has its final outcome, committed (`ingest.batches`); what happens when PostgreSQL
refuses is `ingest.flushing`'s.

Backpressure: past `buffer_max_readings` readings held (waiting, being written, held back),
`full` is true: MQTT stops reading, HTTP answers 503. Rejection records waiting alone (an
MQTT message or an HTTP request with no valid reading) have a bound of their own,
REJECTIONS_WAITING_MAX: past it MQTT stops reading too (the broker keeps the rest), and a new
record is dropped and counted, its message settled, when it could only wait on a database
that is away, or when it comes over HTTP (whose caller already has its 422): invalid input
never takes a valid reading's room, and never grows the daemon's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from db.errors import DatabaseFailure
from db.writes import RejectionRow
from ingest.batches import Outcome, Overloaded, Piece, Submission
from ingest.flushing import Flush, Flusher, Timing
from ingest.lifecycle import Component, Deadline
from ingest.metrics import Metrics
from ingest.readings import Reading

log = logging.getLogger(__name__)

__all__ = ["Outcome", "Overloaded", "Submission", "Writer", "WriterStatus"]

WATCHDOG_TICK_S = 0.1  # how late, at most, a caller hears that its commit timed out
REJECTIONS_WAITING_MAX = 1000
DEFAULT_TIMING = Timing()


@dataclass(frozen=True, slots=True)
class WriterStatus:
    """What /health shows of the writer, at one moment."""

    depth: int  # readings held in memory
    held_readings: int  # of them, held back by the database
    held_since: float | None  # (time.time())
    database_ok: bool  # no flush is retrying
    failure: str  # the last failure that was the database's, in words ("" for none)


class Writer(Component):
    """Runs (as a `Component`) from `async with` on; on leaving, flushes what it holds
    within the shutdown's deadline."""

    name = "writer"

    def __init__(
        self,
        flush: Flush,
        *,
        flush_max_readings: int,
        flush_interval_s: float,
        buffer_max_readings: int,
        flush_concurrency: int = 2,
        metrics: Metrics | None = None,
        timing: Timing = DEFAULT_TIMING,
    ) -> None:
        self._flush_max = flush_max_readings
        self._interval_s = flush_interval_s
        self._buffer_max = buffer_max_readings
        self._pending: deque[Piece] = deque()
        self._pending_weight = 0
        self._inflight_weight = 0
        self._records_waiting = 0
        self._slots = asyncio.Semaphore(flush_concurrency)
        self._flushes: set[asyncio.Task[None]] = set()
        self._oldest_at = 0.0
        self._work = asyncio.Event()
        self._enough = asyncio.Event()
        self._stopping = False
        self.metrics = metrics or Metrics()
        self.metrics.database_up.set_function(lambda: 1 if self.database_ok else 0)
        self.metrics.buffer_depth.set_function(lambda: self.depth)
        self.metrics.buffer_max.set(buffer_max_readings)
        self.metrics.held_readings.set_function(lambda: self.held_readings)
        self.room_listeners: list[Callable[[], None]] = []
        # Told of every failure that is the database's (the daemon runs partition upkeep).
        self.failure_listeners: list[Callable[[DatabaseFailure], None]] = []
        self.flusher = Flusher(
            flush,
            metrics=self.metrics,
            timing=timing,
            on_failure=self._on_failure,
            follow_up=self._follow_up,
        )
        # HTTP callers waiting for their settlement: (deadline, sequence, future, timeout).
        self._deadlines: list[tuple[float, int, asyncio.Future[Outcome], float]] = []
        self._seq = 0
        self._watchdog: asyncio.Task[None] | None = None

    # -- what the rest of the daemon sees ----------------------------------------------------

    @property
    def depth(self) -> int:
        """Readings held in memory: waiting, being written, or held back."""
        flusher = self.flusher
        return (
            self._pending_weight
            + self._inflight_weight
            + flusher.held_weight
            + flusher.retrying_held_weight
        )

    @property
    def backlogged(self) -> bool:
        """A whole batch is waiting behind the flushes in flight: a backlog is draining."""
        return self._pending_weight >= self._flush_max

    @property
    def full(self) -> bool:
        """No room: MQTT stops reading (the broker keeps what it has not delivered)."""
        return self.depth >= self._buffer_max or self._records_waiting >= REJECTIONS_WAITING_MAX

    @property
    def database_ok(self) -> bool:
        """False while a flush is retrying because the database is away or refusing writes
        (HTTP answers 503 at once meanwhile); True again once no flush is retrying, whether
        or not anything came to write since."""
        return self.flusher.retrying == 0

    @property
    def held_readings(self) -> int:
        return self.flusher.held_weight + self.flusher.retrying_held_weight

    @property
    def rejections_written(self) -> int:
        return self.flusher.rejections_written

    def status(self) -> WriterStatus:
        failure = self.flusher.last_failure
        return WriterStatus(
            depth=self.depth,
            held_readings=self.held_readings,
            held_since=self.flusher.held_since,
            database_ok=self.database_ok,
            failure=failure.detail if failure else "",
        )

    def retry_held_now(self) -> None:
        """Try the held readings again without waiting out the back-off (after upkeep)."""
        self.flusher.retry_held_now.set()

    # -- submitting ----------------------------------------------------------------------

    def submit(self, submission: Submission) -> None:
        """Queue a submission; `on_settled` runs once each of its readings has its final
        outcome, committed."""
        if self._stopping:
            raise Overloaded("the daemon is shutting down")
        if not submission.readings and not submission.rejections:
            submission.records_written()  # nothing to write: settled at once
            return
        if not submission.readings:
            if self._records_waiting >= REJECTIONS_WAITING_MAX and (
                submission.transport != "mqtt" or not self.database_ok or self.flusher.held
            ):
                # Invalid input piles up and its record could only wait: dropped (counted),
                # never a valid reading's room.
                self.metrics.rejections_unrecorded.inc(len(submission.rejections))
                submission.records_written()
                return
            self._records_waiting += 1
            told = submission.on_settled

            def settled(outcome: Outcome) -> None:
                self._records_waiting -= 1
                told(outcome)

            submission.on_settled = settled
        self._queue(Piece(submission))

    def _queue(self, piece: Piece, *, first: bool = False) -> None:
        if not self._pending:
            self._oldest_at = time.monotonic()
        if first:
            self._pending.appendleft(piece)
        else:
            self._pending.append(piece)
        self._pending_weight += piece.weight
        self._work.set()
        if self._pending_weight >= self._flush_max:
            self._enough.set()

    def _follow_up(self, pieces: list[Piece]) -> None:
        """Pieces that settle readings of committed submissions (conflicts' records): next."""
        for piece in reversed(pieces):
            self._queue(piece, first=True)

    def drop_pending(self, stale: Callable[[Submission], bool]) -> int:
        """Forget waiting submissions that will come again (unacked MQTT after a reconnect)."""
        forgotten = {
            id(p.submission): p.submission
            for p in (*self._pending, *self.flusher.held)
            if stale(p.submission)
        }
        kept = deque(p for p in self._pending if id(p.submission) not in forgotten)
        dropped = len(self._pending) - len(kept)
        self._pending = kept
        self._pending_weight = sum(p.weight for p in kept)
        dropped += self.flusher.drop_held(lambda p: id(p.submission) in forgotten)
        self._records_waiting -= sum(1 for s in forgotten.values() if not s.readings)
        return dropped

    async def write(
        self,
        readings: Sequence[Reading],
        rejections: Sequence[RejectionRow],
        *,
        transport: str,
        origin: str = "",
        timeout_s: float | None = None,
    ) -> Outcome:
        """Submit and wait for the settlement (HTTP).

        Raises Overloaded at once when the buffer is full or the database is known to be
        down, and when the settlement takes longer than `timeout_s`: a caller is never left
        hanging. What was submitted stays in the buffer and is still written; a retry is a
        duplicate, and duplicates are absorbed.
        """
        if self.depth >= self._buffer_max:  # (records waiting never refuse a reading)
            raise Overloaded(f"the buffer holds {self.depth} readings")
        if not self.database_ok:
            raise Overloaded("the database is unreachable")
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.submit(
            Submission(readings, rejections, lambda o: _resolve(done, o), transport, origin=origin)
        )
        if timeout_s is not None:
            self._expire_after(done, timeout_s)
        return await done

    def _expire_after(self, done: asyncio.Future[Outcome], timeout_s: float) -> None:
        """Fail `done` with Overloaded if nothing settled it within `timeout_s`.

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

    # -- flushing ------------------------------------------------------------------------

    async def run(self) -> None:
        """Flush until stopped; on stop, flush what is left (while the database answers)."""
        retrying = asyncio.create_task(self.flusher.retry_held(self._room), name="writer-held")
        try:
            await self._flush_loop()
        finally:
            retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retrying
            if self.flusher.held:
                failure = self.flusher.last_failure
                log.warning(
                    "stopping with %d readings held back by the database (%s): not stored, "
                    "not acknowledged",
                    self.held_readings,
                    failure.detail if failure else "?",
                    extra=failure.log_fields if failure else None,
                )

    async def _flush_loop(self) -> None:
        while True:
            if not self._pending:
                if self._stopping:
                    if self._flushes:
                        await asyncio.wait(set(self._flushes))
                        continue  # (a flush may have queued records to write next)
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
            flush = asyncio.create_task(self._flush(*self._take()))
            self._flushes.add(flush)
            flush.add_done_callback(self._flush_done)

    def _flush_done(self, flush: asyncio.Task[None]) -> None:
        self._flushes.discard(flush)
        self._slots.release()
        if not flush.cancelled() and flush.exception() is not None:
            log.error("a flush failed unexpectedly", exc_info=flush.exception())

    def stop(self) -> None:
        self._stopping = True
        self._work.set()
        self._enough.set()

    async def finish(self, deadline: Deadline) -> None:
        """Flush what is held, within `deadline`. What is still unflushed then is not
        acknowledged: the broker delivers it again; HTTP callers were answered 503."""
        log.info("stopping: no new readings; flushing %d buffered", self.depth)
        self.stop()
        assert self.task is not None
        await asyncio.wait({self.task}, timeout=deadline.left())
        if not self.task.done():
            log.warning(
                "shutdown deadline (SHUTDOWN_TIMEOUT_S): %d readings not flushed, not "
                "acknowledged (the broker delivers them again)",
                self.depth,
            )

    async def _wait_for_batch(self) -> None:
        remaining = self._oldest_at + self._interval_s - time.monotonic()
        if self._pending_weight >= self._flush_max or remaining <= 0 or self._stopping:
            return
        self._enough.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await self._enough.wait()

    def _take(self) -> tuple[list[Piece], int]:
        """The next batch, and its weight (readings)."""
        taken: list[Piece] = []
        pending = self._pending
        count = weight = 0
        while pending:
            next_weight = pending[0].weight
            if taken and count + max(1, next_weight) > self._flush_max:
                break
            taken.append(pending.popleft())
            count += max(1, next_weight)
            weight += next_weight
        self._pending_weight -= weight
        self._inflight_weight += weight
        if pending:
            self._oldest_at = time.monotonic()
        return taken, weight

    async def _flush(self, pieces: list[Piece], weight: int) -> None:
        try:
            await self.flusher.commit(pieces)
        finally:
            self._inflight_weight -= weight
            self._room()

    def _room(self) -> None:
        if not self.full:
            for listener in self.room_listeners:
                listener()

    def _on_failure(self, failure: DatabaseFailure) -> None:
        for listener in self.failure_listeners:
            listener(failure)


def _resolve(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():
        future.set_result(outcome)
