"""Housekeeping that runs beside ingestion: partitions created ahead and dropped past retention,
the deltas of the hourly roll-ups folded in, and the bound on the `rejections` table.

Partition upkeep runs every UPKEEP_INTERVAL_S, and at once (at most every
UPKEEP_SOONEST_S) when a flush fails for a reason of the database's own, such as a missing
partition: readings held back for that are retried as soon as it succeeds. A failing upkeep
is on /health and in the metrics, not only in the log: past PARTITION_LOOKAHEAD_DAYS it would
stop every write. It is tried again with back-off (UPKEEP_RETRY_FIRST_S doubling to
UPKEEP_RETRY_MAX_S) until it succeeds, not at the next hourly round: an outage of the
database that spans an upkeep run leaves /health red for seconds after it, not an hour.

The deltas each flush appends are folded into the roll-ups every ROLLUP_FOLD_S, and at once
again while a fold finds a full batch: the fewer deltas wait, the less analytics read. While
the writer has a backlog to drain, folding waits (up to FOLD_DEFER_MAX_S): it competes for
the database with the flushes (8 % of a single-reading drain, BENCHMARKS.md), and analytics
read the deltas meanwhile, so their figures stay whole. A failed fold loses nothing.

Trimming the rejections is tried every TRIM_EVERY_S while rejections were written, until it
succeeds.

With ARCHIVE_DIR, upkeep leaves the raw partitions past retention in place, and each is then
exported to Parquet, verified and dropped (`db.archive`), oldest first, on the control pool,
at start and after every upkeep. A partition that fails is kept (logged, counted in
`energy_ingest_archive_failures_total`) and tried again after the next upkeep; /health is not
affected (ingestion is not: a kept partition only holds disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from db.archive import archive_partition, oldest_first
from db.errors import DatabaseFailure, PersistentFailure, classify
from db.partitions import UpkeepReport, rollup_first_day, upkeep
from db.rejections import trim_rejections
from db.rollup import FOLD_BATCH, fold
from ingest.config import Settings
from ingest.lifecycle import Component
from ingest.metrics import Metrics
from ingest.writer import Writer

log = logging.getLogger(__name__)

UPKEEP_SOONEST_S = 10.0
UPKEEP_RETRY_FIRST_S = 1.0
UPKEEP_RETRY_MAX_S = 10.0
TRIM_EVERY_S = 1.0
FOLD_DEFER_MAX_S = 30.0


async def run_upkeep(conn: asyncpg.Connection, settings: Settings) -> UpkeepReport:
    return await upkeep(
        conn,
        schema=settings.db_schema,
        now=datetime.now(UTC),
        retention_days=settings.retention_days,
        lookahead_days=settings.partition_lookahead_days,
        rollup_retention_days=settings.rollup_retention_days,
        archive=settings.archive_dir is not None,
    )


@dataclass(slots=True)
class UpkeepStatus:
    ok: bool = True
    detail: str = ""
    failing_since: float | None = None


class Housekeeping(Component):
    """Runs (as a `Component`) from `async with` on: partition upkeep, the rejections'
    bound."""

    name = "housekeeping"

    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, writer: Writer, metrics: Metrics
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._writer = writer
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._last_run = 0.0
        self._fold_failing = False
        self.status = UpkeepStatus()
        writer.failure_listeners.append(self._on_write_failure)

    def _on_write_failure(self, failure: DatabaseFailure) -> None:
        if isinstance(failure, PersistentFailure):
            self._wake.set()

    async def run(self) -> None:
        await asyncio.gather(self._partitions(), self._folds(), self._rejection_bound())

    async def _partitions(self) -> None:
        # With an archive, a first round at once: what the start-up's upkeep left to export.
        wait_s = 0.0 if self._settings.archive_dir else float(self._settings.upkeep_interval_s)
        retry_s = UPKEEP_RETRY_FIRST_S
        while True:
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()
                woken = True
            self._wake.clear()
            if woken:  # (a flush failing again and again runs upkeep once every 10 s)
                await asyncio.sleep(max(0.0, self._last_run + UPKEEP_SOONEST_S - time.monotonic()))
            self._last_run = time.monotonic()
            if await self.partitions_once():
                wait_s, retry_s = float(self._settings.upkeep_interval_s), UPKEEP_RETRY_FIRST_S
            else:
                wait_s, retry_s = retry_s, min(retry_s * 2, UPKEEP_RETRY_MAX_S)

    async def partitions_once(self) -> bool:
        """One run of partition upkeep; False if it failed (the status says why)."""
        try:
            async with self._pool.acquire() as conn:
                report = await run_upkeep(conn, self._settings)
        except Exception as error:  # the next round tries again; writes go on meanwhile
            self._metrics.upkeep_failures.inc()
            first = self.status.ok
            if first:
                self.status.failing_since = time.time()
            self.status.ok = False
            self.status.detail = f"partition upkeep failing: {error.__class__.__name__}: {error}"
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "%s (trying again with back-off)",
                self.status.detail,
                extra=classify(error).log_fields,
            )
            return False
        if not self.status.ok:
            log.info("partition upkeep works again")
        self.status = UpkeepStatus()
        self._metrics.upkeep_last_success.set(time.time())
        self._writer.retry_held_now()
        if report.expired:
            await self.archive_once(report.expired)
        return True

    async def archive_once(self, partitions: list[str]) -> int:
        """Export, verify and drop each partition, oldest first; how many were archived.
        One that fails is kept, and the next (of another day or stream) is tried."""
        archive_dir = self._settings.archive_dir
        assert archive_dir is not None
        archived = 0
        for partition in oldest_first(partitions):
            started = time.monotonic()
            try:
                async with self._pool.acquire() as conn:
                    done = await archive_partition(
                        conn,
                        schema=self._settings.db_schema,
                        partition=partition,
                        archive_dir=archive_dir,
                    )
            except Exception as error:  # ArchiveError, or the pool's: kept, tried again
                self._metrics.archive_failures.inc()
                log.warning("archiving %s failed, kept for the next upkeep: %s", partition, error)
                continue
            if done is None:  # another daemon is archiving, or it is gone already
                continue
            archived += 1
            if done.before:
                log.info("%s held nothing; %s, archived before, kept", partition, done.path)
                continue
            self._metrics.archived_partitions.labels(done.stream).inc()
            log.info(
                "archived %s to %s: %d rows, %.6f kWh, %d bytes, %.1f s; partition dropped",
                partition,
                done.path,
                done.rows,
                done.kwh,
                done.bytes,
                time.monotonic() - started,
            )
        return archived

    async def _folds(self) -> None:
        folded_at = time.monotonic()
        while True:
            if self._writer.backlogged and time.monotonic() - folded_at < FOLD_DEFER_MAX_S:
                await asyncio.sleep(self._settings.rollup_fold_s)  # the drain first
                continue
            moved = await self.fold_once()
            folded_at = time.monotonic()
            if moved is None or moved < FOLD_BATCH:
                await asyncio.sleep(self._settings.rollup_fold_s)

    async def fold_once(self) -> int | None:
        """Fold what deltas wait into the roll-ups; how many moved (None: it failed)."""
        now = datetime.now(UTC)
        oldest = rollup_first_day(
            now, self._settings.retention_days, self._settings.rollup_retention_days
        )
        try:
            async with self._pool.acquire() as conn:
                moved = await fold(
                    conn,
                    schema=self._settings.db_schema,
                    oldest_hour=datetime(oldest.year, oldest.month, oldest.day, tzinfo=UTC),
                )
        except Exception as error:  # tried again at the next round; nothing is lost
            self._metrics.rollup_fold_failures.inc()
            level = logging.DEBUG if self._fold_failing else logging.WARNING
            log.log(
                level,
                "folding the roll-ups' deltas failed (trying again): %s",
                error,
                extra=classify(error).log_fields,
            )
            self._fold_failing = True
            return None
        if self._fold_failing:
            log.info("folding the roll-ups' deltas works again")
            self._fold_failing = False
        if moved:
            self._metrics.rollup_deltas_folded.inc(moved)
        return moved or 0

    async def _rejection_bound(self) -> None:
        """Keep the newest REJECTIONS_MAX_ROWS rejections; count what goes."""
        trimmed_at = -1
        while True:
            await asyncio.sleep(TRIM_EVERY_S)
            written = self._writer.rejections_written
            if written == trimmed_at:
                continue
            try:
                async with self._pool.acquire() as conn:
                    dropped = await trim_rejections(conn, self._settings.rejections_max_rows)
            except Exception as error:  # tried again in a second
                log.debug("trimming rejections failed: %s", error)
                continue
            trimmed_at = written
            if dropped:
                self._metrics.rejections_dropped.inc(dropped)
