"""Is PostgreSQL there? Asked once a second on a connection of its own, which nothing else
uses: /health reads the last answer and never waits for the database, and a database busy
with operators' reads is told from one that is down.

- **up**: it answered (within HEALTH_ANSWER_S).
- **busy**: the question is out and no answer came within HEALTH_ANSWER_S, but the
  connection stands: PostgreSQL is slow, not gone. Busy is not unhealthy, until no answer
  came for HEALTH_GIVE_UP_S: then the connection is dropped and the database called down.
- **down**: no connection (refused, lost, no host taking writes, a password refused), with
  PostgreSQL's or the network's reason.
- **read-only**: the primary's URL led to a standby, or to a database set read-only: writes
  cannot succeed there.

A replica (DATABASE_READ_URL) is asked the same, and how far its replay lags behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import asyncpg

from db.errors import classify
from db.pool import connect

log = logging.getLogger(__name__)

HEALTH_EVERY_S = 1.0
HEALTH_ANSWER_S = 1.0
HEALTH_GIVE_UP_S = 30.0

PRIMARY_QUESTION = """
SELECT pg_is_in_recovery() AS standby,
       current_setting('transaction_read_only') = 'on' AS read_only,
       NULL::float8 AS lag_s, NULL::text AS receiving"""
# Replay lag: how old the newest transaction replayed is, while the replica is behind: WAL
# received is still to be replayed, or no WAL is received (the primary's newer work cannot
# be known then); 0 when replay has caught up with a stream that flows. (Behind before it
# replayed any transaction, the age is unknown: `DatabaseProbe` counts from when it saw it.)
REPLICA_QUESTION = """
SELECT pg_is_in_recovery() AS standby, true AS read_only, behind,
       CASE WHEN behind THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
            ELSE 0
       END AS lag_s,
       receiving
FROM (SELECT (SELECT status FROM pg_stat_wal_receiver LIMIT 1) AS receiving) AS receiver,
     LATERAL (SELECT pg_is_in_recovery()
                     AND (receiving IS DISTINCT FROM 'streaming'
                          OR pg_last_wal_receive_lsn() IS DISTINCT FROM pg_last_wal_replay_lsn())
                     AS behind) AS state"""


@dataclass(frozen=True, slots=True)
class DatabaseStatus:
    state: str  # up, busy, down, read-only
    detail: str
    lag_s: float | None = None  # a replica's replay lag

    @property
    def ok(self) -> bool:
        return self.state in ("up", "busy")


class DatabaseProbe:
    """One connection, one question a second; `status` is the last answer (or the lack of
    one). An async context manager: the asking starts on entry and stops on exit."""

    def __init__(self, dsn: str, *, schema: str, pooler: str, replica: bool = False) -> None:
        self._dsn = dsn
        self._schema = schema
        self._pooler = pooler
        self._replica = replica
        self._question = REPLICA_QUESTION if replica else PRIMARY_QUESTION
        self._conn: asyncpg.Connection | None = None
        self._asked_at: float | None = None
        self._behind_since: float | None = None  # (a replica seen behind, its lag unknown)
        self._last = DatabaseStatus("up", "not asked yet")
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> DatabaseProbe:
        await self.ask_once()
        self._task = asyncio.create_task(self._keep_asking(), name="database-probe")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._drop()

    @property
    def status(self) -> DatabaseStatus:
        asked = self._asked_at
        if asked is not None and self._conn is not None:
            waited = time.monotonic() - asked
            if waited > HEALTH_ANSWER_S:
                return DatabaseStatus(
                    "busy",
                    f"PostgreSQL is busy: no answer to a trivial query for {waited:.1f} s "
                    "(the connection stands)",
                    self._last.lag_s,
                )
        return self._last

    async def _keep_asking(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_EVERY_S)
            await self.ask_once()

    async def ask_once(self) -> None:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await connect(
                    self._dsn, schema=self._schema, pooler=self._pooler, purpose="health"
                )
            self._asked_at = time.monotonic()
            row = await self._conn.fetchrow(self._question, timeout=HEALTH_GIVE_UP_S)
        except TimeoutError:
            self._drop()
            self._set(
                DatabaseStatus("down", f"no answer within {HEALTH_GIVE_UP_S:g} s"),
                {"cause": "TimeoutError"},
            )
        except Exception as error:  # any failure here means "down", with its reason
            self._drop()
            self._set(DatabaseStatus("down", _reason(error)), classify(error).log_fields)
        else:
            self._set(self._judge(row))
        finally:
            self._asked_at = None

    def _judge(self, row: Mapping[str, Any]) -> DatabaseStatus:
        lag_s = row["lag_s"]
        if self._replica:
            detail = "" if row["receiving"] in (None, "streaming") else "not streaming"
            if lag_s is None and row["behind"]:  # at least as long as it has been seen so
                now = time.monotonic()
                self._behind_since = self._behind_since or now
                lag_s = now - self._behind_since
            elif not row["behind"]:
                self._behind_since = None
            return DatabaseStatus("up", detail, lag_s)
        if row["standby"]:
            return DatabaseStatus("read-only", "connected to a standby: no primary takes writes")
        if row["read_only"]:
            return DatabaseStatus("read-only", "the database is read-only (transaction_read_only)")
        return DatabaseStatus("up", "")

    def _set(self, status: DatabaseStatus, fields: dict[str, str] | None = None) -> None:
        if status.state != self._last.state and self._last.detail != "not asked yet":
            which = "replica" if self._replica else "database"
            detail = f": {status.detail}" if status.detail else ""
            log.info("%s %s%s", which, status.state, detail, extra=fields)
        self._last = status

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None


def _reason(error: BaseException) -> str:
    if isinstance(error, asyncpg.PostgresError | OSError | asyncpg.InterfaceError):
        return classify(error).detail
    return f"{error.__class__.__name__}: {error}"
