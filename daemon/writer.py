"""The write path that MQTT and HTTP share: a bounded buffer and the transactional flusher.

Submissions wait in the buffer until it holds `flush_max_readings` or `flush_interval` has
passed since the oldest one arrived; then they are written in one transaction. A
submission's `on_committed` runs only after that transaction has committed: that is where
MQTT sends its PUBACK and HTTP answers 201, so nothing is acknowledged that a crash could
still lose.

When PostgreSQL refuses a flush, `db.errors` says whose fault it is:
- a reading's (DataFailure): the batch is split until that reading stands alone; it is
  recorded as a rejection and everything else is written;
- the database's, for now (TransientFailure: connection lost, shutting down, disk full...):
  the same batch is retried with back-off;
- the database's, for good until someone mends it (PersistentFailure: a missing partition,
  permissions, schema drift): the batch is split to commit whatever can be committed, and
  the rest is *held*: kept in the buffer, not acknowledged, retried with back-off outside the
  flush slots (so that it never blocks them), reported on /health and in the metrics, its
  cause logged once rather than at every retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

import asyncpg
import orjson

from daemon.batches import (
    Outcome,
    Overloaded,
    Submission,
    batch_of,
    notify,
    settle,
)
from daemon.metrics import Metrics
from daemon.readings import Reading
from db.errors import (
    DatabaseFailure,
    DataFailure,
    PersistentFailure,
    TransientFailure,
    classify,
)
from db.writes import RejectionRow, Stored, flush_batch

log = logging.getLogger(__name__)

__all__ = ["Outcome", "Overloaded", "Submission", "Writer"]

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
HELD_RETRY_FIRST_S = 1.0
HELD_RETRY_MAX_S = 30.0
# Transactions spent splitting one failing batch before the rest of it is held as a whole.
SEPARATION_BUDGET = 64
# The same cause is logged again at most this often (with what it holds by then).
FAILURE_LOG_EVERY_S = 60.0
WATCHDOG_TICK_S = 0.1  # how late, at most, a caller hears that its commit timed out


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
        # Flushes retrying a failure of the database's (TransientFailure) right now.
        self._retrying = 0
        self.metrics = metrics or Metrics()
        self.metrics.database_up.set_function(lambda: 1 if self.database_ok else 0)
        self.metrics.buffer_depth.set_function(lambda: self.depth)
        self.metrics.held_readings.set_function(lambda: self.held_readings)
        self.room_listeners: list[Callable[[], None]] = []
        # Told of every failure that is the database's (the daemon runs partition upkeep).
        self.failure_listeners: list[Callable[[DatabaseFailure], None]] = []
        # Submissions the database keeps refusing (PersistentFailure), retried apart.
        self._held: list[Submission] = []
        self.held_readings = 0
        self.held_since: float | None = None
        self.last_failure: DatabaseFailure | None = None
        self._retry_held_now = asyncio.Event()
        self.rejections_written = 0
        self._logged: dict[str, float] = {}
        # HTTP callers waiting for their commit: (deadline, sequence, future, timeout).
        self._deadlines: list[tuple[float, int, asyncio.Future[Outcome], float]] = []
        self._seq = 0
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Readings held in memory: waiting, being written, or held back."""
        return self._pending_readings + self._inflight_readings + self.held_readings

    @property
    def database_ok(self) -> bool:
        """False while a flush is retrying because the database is away or refusing writes
        (HTTP answers 503 at once meanwhile); True again once no flush is retrying, whether
        or not anything came to write since."""
        return self._retrying == 0

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
        held = [s for s in self._held if not stale(s)]
        dropped += len(self._held) - len(held)
        self._held = held
        self.held_readings = sum(s.weight for s in held)
        if not held:
            self.held_since = None
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
        retrying = asyncio.create_task(self._retry_held(), name="writer-held")
        try:
            await self._flush_loop()
        finally:
            retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retrying
            if self._held:
                log.warning(
                    "stopping with %d readings held back by the database (%s): not stored, "
                    "not acknowledged",
                    self.held_readings,
                    self.last_failure.detail if self.last_failure else "?",
                )

    async def _flush_loop(self) -> None:
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

    def retry_held_now(self) -> None:
        """Try the held readings again without waiting out the back-off (after upkeep)."""
        self._retry_held_now.set()

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
            self._room()

    def _room(self) -> None:
        if not self.full:
            for listener in self.room_listeners:
                listener()

    # -- committing, and what happens when PostgreSQL refuses -----------------------------

    async def _commit(self, submissions: list[Submission]) -> None:
        """Commit; retry while the database is away; separate what it keeps refusing."""
        backoff = BACKOFF_FIRST_S
        retrying = False
        try:
            while True:
                failure = await self._attempt(submissions)
                if failure is None:
                    return
                if isinstance(failure, DataFailure):
                    await self._isolate(submissions, failure)
                    return
                if isinstance(failure, PersistentFailure):
                    await self._separate(submissions, failure)
                    return
                if not retrying:
                    retrying = True
                    self._retrying += 1
                self._report(failure, f"retrying {len(submissions)} submissions with back-off")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            if retrying:
                self._retrying -= 1

    async def _attempt(self, submissions: Sequence[Submission]) -> DatabaseFailure | None:
        """One transaction; settles the submissions on success, else returns why not."""
        try:
            stored = await self._transaction(submissions)
        except DatabaseFailure as failure:
            self.metrics.flush_failures.labels(type(failure).__name__, failure.cause).inc()
            if not isinstance(failure, DataFailure):
                self.last_failure = failure
                for listener in self.failure_listeners:
                    listener(failure)
            return failure
        settle(submissions, stored, self.metrics)
        return None

    async def _transaction(self, submissions: Sequence[Submission]) -> dict[str, Stored]:
        batch = batch_of(submissions)
        started = time.perf_counter()
        try:
            async with self._pool.acquire() as conn:
                try:
                    stored = await flush_batch(conn, batch)
                except Exception as error:
                    failure = classify(error)
                    if failure.wrong_server:  # the next connection looks for the primary
                        conn.terminate()
                    raise failure from error
        except DatabaseFailure:
            raise
        except Exception as error:
            raise classify(error) from error
        self.rejections_written += len(batch.rejections)
        self.metrics.flush_seconds.observe(time.perf_counter() - started)
        self.metrics.last_commit.set(time.time())
        self.metrics.flush_size.observe(sum(len(rows) for rows in batch.rows.values()))
        return stored

    async def _separate(self, submissions: list[Submission], failure: PersistentFailure) -> None:
        """Commit every part of the batch the database takes; hold the rest."""
        stuck: list[Submission] = []
        await self._bisect(submissions, stuck, [SEPARATION_BUDGET])
        if stuck:
            self._hold(stuck, failure)

    async def _bisect(
        self, submissions: list[Submission], stuck: list[Submission], budget: list[int]
    ) -> None:
        if len(submissions) == 1 or budget[0] <= 0:
            stuck.extend(submissions)
            return
        middle = len(submissions) // 2
        for half in (submissions[:middle], submissions[middle:]):
            budget[0] -= 1
            failure = await self._attempt(half)
            if failure is None:
                continue
            if isinstance(failure, DataFailure):
                await self._isolate(half, failure)
            elif isinstance(failure, TransientFailure):
                stuck.extend(half)  # tried again with the held ones
            else:
                await self._bisect(half, stuck, budget)

    def _hold(self, submissions: list[Submission], failure: DatabaseFailure) -> None:
        self._held.extend(submissions)
        self.held_readings += sum(s.weight for s in submissions)
        if self.held_since is None:
            self.held_since = time.time()
        self._report(failure, f"holding {self.held_readings} readings, not acknowledged")

    async def _retry_held(self) -> None:
        backoff = HELD_RETRY_FIRST_S
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_held_now.wait(), backoff)
            self._retry_held_now.clear()
            if not self._held:
                backoff = HELD_RETRY_FIRST_S
                continue
            held, self._held = self._held, []
            weight, self.held_readings = self.held_readings, 0
            self._inflight_readings += weight
            try:
                failure = await self._attempt(held)
                stuck: list[Submission] = []
                if isinstance(failure, DataFailure):
                    await self._isolate(held, failure)
                elif isinstance(failure, TransientFailure):
                    stuck = held
                elif failure is not None:
                    await self._bisect(held, stuck, [SEPARATION_BUDGET])
                self._held.extend(stuck)
                self.held_readings += sum(s.weight for s in stuck)
            finally:
                self._inflight_readings -= weight
            if self._held:
                backoff = min(backoff * 2, HELD_RETRY_MAX_S)
            else:
                log.info("the readings held back by the database are stored now")
                self.held_since = None
                backoff = HELD_RETRY_FIRST_S
            self._room()

    def _report(self, failure: DatabaseFailure, doing: str) -> None:
        """Log a cause once, then at most every FAILURE_LOG_EVERY_S, not at every retry."""
        key = f"{type(failure).__name__}:{failure.cause}"
        now = time.monotonic()
        if now - self._logged.get(key, -FAILURE_LOG_EVERY_S) >= FAILURE_LOG_EVERY_S:
            self._logged[key] = now
            log.warning("PostgreSQL refused a flush (%s); %s", failure.detail, doing)

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
        notify(
            submission,
            Outcome(
                accepted=sum(o.accepted for o in outcomes),
                duplicates=sum(o.duplicates for o in outcomes),
                refused_by_database=tuple(r for o in outcomes for r in o.refused_by_database),
            ),
        )

    async def _refuse(self, submission: Submission, failure: DataFailure) -> None:
        """A single reading the database refused: record why, keep everything else."""
        self._report(failure, "recording the reading as a rejection")
        if submission.readings:
            reading = submission.readings[0]
            refusal = RejectionRow(
                received_at=submission.received_at,
                source=submission.transport,
                topic_or_route="(database)",
                payload=orjson.dumps(reading.model_dump(mode="json", by_alias=True)).decode(),
                reason=f"refused by the database: {failure.detail}",
            )
            await self._commit([Submission([], [refusal], _ignore, submission.transport)])
        notify(submission, Outcome(0, 0, refused_by_database=(failure.detail,)))


def _resolve(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():
        future.set_result(outcome)


def _ignore(_: Outcome) -> None:
    return None
