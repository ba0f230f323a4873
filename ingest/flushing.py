"""Committing pieces of submissions, and what happens when PostgreSQL refuses.

`db.errors` says whose fault a refusal is:
- a reading's (DataFailure): the pieces are split until the refused reading stands alone;
  it is settled as refused, with a record of why, and everything else is written;
- the database's, for now (TransientFailure: connection lost, no primary, read-only,
  shutting down, disk full...): the same pieces are retried with back-off;
- the database's until someone mends it (PersistentFailure: a missing partition,
  permissions, schema drift, an error of ours): the pieces are split to commit whatever can
  be committed, and the rest is *held*: kept, not settled, retried with back-off outside the
  flush slots (so that it never blocks them), reported on /health and in the metrics, its
  cause logged once rather than at every retry.

Nothing here settles a submission: `ingest.batches.settle` does, after a commit, reading by
reading. A held or retried piece keeps its submission open.

The database is reached through one seam, `Flush`: a coroutine that writes a batch in one
transaction and returns what each stream stored, or raises a DatabaseFailure. The daemon's
is `PoolFlush` (a pool of its own, `db.writes.flush_batch`); tests give their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from db.errors import (
    DatabaseFailure,
    DataFailure,
    PersistentFailure,
    TransientFailure,
    classify,
)
from db.writes import FlushBatch, Key, Stored, flush_batch, stored_values
from ingest.batches import Piece, batch_of, refusal_piece, settle
from ingest.metrics import Metrics

log = logging.getLogger(__name__)

Flush = Callable[[FlushBatch], Awaitable[dict[str, Stored]]]
# Transactions spent splitting one failing batch before the rest of it is held as a whole.
SEPARATION_BUDGET = 64
# The same cause is logged again at most this often (with what it holds by then).
FAILURE_LOG_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class Timing:
    """Back-off of retries: a batch while the database is away (TransientFailure), and the
    held pieces (PersistentFailure)."""

    backoff_first_s: float = 0.1
    backoff_max_s: float = 5.0
    held_retry_first_s: float = 1.0
    held_retry_max_s: float = 30.0


class PoolFlush:
    """The daemon's seam: one transaction on a connection of the write pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def __call__(self, batch: FlushBatch) -> dict[str, Stored]:
        try:
            async with self._pool.acquire() as conn:
                try:
                    stored = await flush_batch(conn, batch)
                    await _complete(conn, stored, batch)
                except Exception as error:
                    failure = classify(error)
                    if failure.wrong_server:  # the next connection looks for the primary
                        conn.terminate()
                    raise failure from error
        except DatabaseFailure:
            raise
        except Exception as error:
            raise classify(error) from error
        return stored


async def _complete(conn: asyncpg.Connection, stored: dict[str, Stored], batch: FlushBatch) -> None:
    """Keys neither stored now nor seen before the statement were stored meanwhile by
    another transaction (another daemon): read what they hold, for the conflict rule."""
    for stream, result in stored.items():
        if result.keys is None:
            continue
        missing: list[Key] = [
            (row[0], row[1])
            for row in batch.rows[stream]
            if (row[0], row[1]) not in result.keys and (row[0], row[1]) not in result.before
        ]
        if missing:
            result.before.update(await stored_values(conn, stream, missing))


class Flusher:
    def __init__(
        self,
        flush: Flush,
        *,
        metrics: Metrics,
        timing: Timing,
        on_failure: Callable[[DatabaseFailure], None],
        follow_up: Callable[[list[Piece]], None],
    ) -> None:
        self._flush = flush
        self._metrics = metrics
        self._timing = timing
        self._on_failure = on_failure
        self._follow_up = follow_up  # pieces to write next (conflicts' records)
        self.retrying = 0  # flushes retrying a TransientFailure now
        self.held: list[Piece] = []
        self.held_weight = 0
        self.retrying_held_weight = 0  # held pieces out for a retry now
        self.held_since: float | None = None
        self.last_failure: DatabaseFailure | None = None
        self.retry_held_now = asyncio.Event()
        self.rejections_written = 0  # (the bound on the table is kept once some were)
        self._logged: dict[str, float] = {}
        self._bugs_logged: set[type[BaseException]] = set()

    # -- one attempt ---------------------------------------------------------------------

    async def attempt(self, pieces: Sequence[Piece]) -> DatabaseFailure | None:
        """One transaction; settles what it committed, else returns why not."""
        batch = batch_of(pieces)
        started = time.perf_counter()
        try:
            stored = await self._flush(batch.rows)
        except DatabaseFailure as failure:
            return self._failed(failure)
        except Exception as error:  # a bug of ours: held, like an unknown failure
            return self._failed(self._bug(error))
        self._metrics.flush_seconds.observe(time.perf_counter() - started)
        self._metrics.last_commit.set(time.time())
        self._metrics.flush_size.observe(sum(len(r) for r in batch.rows.rows.values()))
        self.rejections_written += len(batch.rows.rejections)
        follow_ups = settle(batch, stored, self._metrics)
        if follow_ups:
            self._follow_up(follow_ups)
        return None

    def _failed(self, failure: DatabaseFailure) -> DatabaseFailure:
        self._metrics.flush_failures.labels(type(failure).__name__, failure.cause).inc()
        if not isinstance(failure, DataFailure):
            self.last_failure = failure
            self._on_failure(failure)
        return failure

    def _bug(self, error: Exception) -> PersistentFailure:
        self._metrics.internal_errors.labels("flush").inc()
        if type(error) not in self._bugs_logged:
            self._bugs_logged.add(type(error))
            log.error("an error of ours while flushing (held, retried)", exc_info=error)
        return PersistentFailure(f"internal error {type(error).__name__}: {error}")

    # -- committing, whatever PostgreSQL says ----------------------------------------------

    async def commit(self, pieces: list[Piece]) -> None:
        """Commit; retry while the database is away; take apart what it refuses."""
        backoff = self._timing.backoff_first_s
        retrying = False
        try:
            while True:
                failure = await self.attempt(pieces)
                if failure is None:
                    return
                if isinstance(failure, DataFailure):
                    await self._isolate(pieces, failure)
                    return
                if isinstance(failure, PersistentFailure):
                    await self._separate(pieces, failure)
                    return
                if not retrying:
                    retrying = True
                    self.retrying += 1
                self._report(failure, f"retrying {len(pieces)} pieces with back-off")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._timing.backoff_max_s)
        finally:
            if retrying:
                self.retrying -= 1

    async def _isolate(self, pieces: list[Piece], failure: DataFailure) -> None:
        """The database refused a row: split until the refused reading stands alone."""
        if len(pieces) > 1:
            middle = len(pieces) // 2
            await self.commit(pieces[:middle])
            await self.commit(pieces[middle:])
            return
        (piece,) = pieces
        if piece.units() > 1:
            first, second = piece.halves()
            await self.commit([first])
            await self.commit([second])
        elif piece.reading_count == 1:
            ((position, reading),) = piece.readings()
            about = {
                "stream": reading.stream.value,
                "device": reading.device_id,
                "transport": piece.submission.transport,
            }
            self._report(failure, "recording the reading as refused", about)
            await self.commit([refusal_piece(piece, position, failure.detail)])
        else:  # a record PostgreSQL will not take, whatever it holds
            self._drop_records(piece, failure)

    def _drop_records(self, piece: Piece, failure: DataFailure) -> None:
        log.error(
            "a rejection record could not be written (%s): dropped",
            failure.detail,
            extra=failure.log_fields,
        )
        self._metrics.rejections_unrecorded.inc(len(piece.records()))
        submission = piece.submission
        if piece.own_records and submission.rejections:
            submission.records_written()
        for verdict in piece.verdicts:
            submission.resolve(verdict.kind, verdict.position, verdict.reason)

    async def _separate(self, pieces: list[Piece], failure: PersistentFailure) -> None:
        """Commit every part of the pieces the database takes; hold the rest."""
        stuck: list[Piece] = []
        await self._bisect(pieces, stuck, [SEPARATION_BUDGET])
        if stuck:
            self._hold(stuck, failure)

    async def _bisect(self, pieces: list[Piece], stuck: list[Piece], budget: list[int]) -> None:
        if budget[0] <= 0 or (len(pieces) == 1 and pieces[0].units() == 1):
            stuck.extend(pieces)
            return
        halves = (
            [pieces[: len(pieces) // 2], pieces[len(pieces) // 2 :]]
            if len(pieces) > 1
            else [[half] for half in pieces[0].halves()]
        )
        for half in halves:
            budget[0] -= 1
            failure = await self.attempt(half)
            if failure is None:
                continue
            if isinstance(failure, DataFailure):
                await self._isolate(half, failure)
            elif isinstance(failure, TransientFailure):
                stuck.extend(half)  # tried again with the held ones
            else:
                await self._bisect(half, stuck, budget)

    # -- held pieces ---------------------------------------------------------------------

    def _hold(self, pieces: list[Piece], failure: DatabaseFailure) -> None:
        self.held.extend(pieces)
        self.held_weight += sum(p.weight for p in pieces)
        if self.held_since is None:
            self.held_since = time.time()
        self._report(failure, f"holding {self.held_weight} readings, not acknowledged")

    def drop_held(self, stale: Callable[[Piece], bool]) -> int:
        kept = [p for p in self.held if not stale(p)]
        dropped = len(self.held) - len(kept)
        self.held = kept
        self.held_weight = sum(p.weight for p in kept)
        if not kept:
            self.held_since = None
        return dropped

    async def retry_held(self, room: Callable[[], None]) -> None:
        """Until cancelled: the held pieces again, with back-off (at once when asked)."""
        backoff = self._timing.held_retry_first_s
        while True:
            # (asyncio.timeout, not wait_for: in Python 3.11 a wait_for whose event is set
            # as it is cancelled swallows the cancellation, and a stop would hang on it.)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self.retry_held_now.wait()
            self.retry_held_now.clear()
            if not self.held:
                backoff = self._timing.held_retry_first_s
                continue
            held, self.held = self.held, []
            self.retrying_held_weight, self.held_weight = self.held_weight, 0
            stuck: list[Piece] = []
            try:
                failure = await self.attempt(held)
                if isinstance(failure, DataFailure):
                    await self._isolate(held, failure)
                elif isinstance(failure, TransientFailure):
                    stuck = held
                elif failure is not None:
                    await self._bisect(held, stuck, [SEPARATION_BUDGET])
            finally:
                self.retrying_held_weight = 0
                self.held.extend(stuck)
                self.held_weight += sum(p.weight for p in stuck)
            if self.held:
                backoff = min(backoff * 2, self._timing.held_retry_max_s)
            else:
                log.info("the readings held back by the database are stored now")
                self.held_since = None
                backoff = self._timing.held_retry_first_s
            room()

    def _report(
        self, failure: DatabaseFailure, doing: str, about: dict[str, str] | None = None
    ) -> None:
        """Log a cause once, then at most every FAILURE_LOG_EVERY_S, not at every retry."""
        key = f"{type(failure).__name__}:{failure.cause}"
        now = time.monotonic()
        if now - self._logged.get(key, -FAILURE_LOG_EVERY_S) >= FAILURE_LOG_EVERY_S:
            self._logged[key] = now
            fields = {**failure.log_fields, **(about or {})}
            log.warning("PostgreSQL refused a flush (%s); %s", failure.detail, doing, extra=fields)
