"""Whose fault is it? A write that PostgreSQL refuses, decided by SQLSTATE, never by message
text: either something about *a reading* (reject that reading, with the reason, and
acknowledge its message) or something about *the database* (never acknowledge; retry,
report, recover). A class of errors is never both.

DatabaseFailure
 ├── DataFailure        a value PostgreSQL refuses in a row: class 22 (data exception), or
 │                      class 23 naming the constraint or column at fault. Split the batch
 │                      until the reading stands alone; reject it; write the rest.
 ├── TransientFailure   the database is away or busy: connection lost (class 08, and no
 │                      connection at all), no host taking writes (a failover under way),
 │                      a read-only node (25006: a standby, or a primary set read-only; the
 │                      connection is dropped, so the next one finds the primary),
 │                      shutting down (57P01-57P03), serialization or deadlock (40), out of
 │                      resources (53: disk full, memory, connections), lock or statement
 │                      timeout (55P03, 57014). Retry the same batch after a back-off.
 └── PersistentFailure  the database is there but refuses the batch for a reason of its own:
                        no partition for a row (23514 naming no constraint), permissions
                        (42501), a table or column missing (schema drift, 42P01 / 42703),
                        anything unexpected. Commit what can be committed, hold the rest
                        (not acknowledged) and retry it with back-off until the cause is
                        mended.
"""

from __future__ import annotations

import asyncpg
from asyncpg.exceptions import TargetServerAttributeNotMatched

_TRANSIENT_CLASSES = ("08", "40", "53")
READ_ONLY = "25006"  # read_only_sql_transaction
_TRANSIENT_STATES = ("57P01", "57P02", "57P03", "55P03", "57014", READ_ONLY)


class DatabaseFailure(Exception):
    def __init__(self, detail: str, *, sqlstate: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.sqlstate = sqlstate

    @property
    def wrong_server(self) -> bool:
        """The connection leads to a server that cannot take writes (a standby, or one set
        read-only): drop it, so that the next connection looks for the primary."""
        return self.sqlstate == READ_ONLY

    @property
    def cause(self) -> str:
        """What identifies this failure for the log and the metrics: its SQLSTATE, or the
        kind of error when there is none."""
        return self.sqlstate or self.detail.split(":", 1)[0]

    @property
    def log_fields(self) -> dict[str, str]:
        """The fields of a log line about this failure (`extra=`; LOG_FORMAT=json)."""
        return {"sqlstate": self.sqlstate, "cause": self.cause}


class DataFailure(DatabaseFailure):
    pass


class TransientFailure(DatabaseFailure):
    pass


class PersistentFailure(DatabaseFailure):
    pass


# What talking to PostgreSQL can raise; anything else is an error of ours (a bug), never to be
# reported as the database's.
DATABASE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
    TargetServerAttributeNotMatched,
)


def classify(error: BaseException) -> DatabaseFailure:
    """Map an exception raised while talking to PostgreSQL onto how to handle it."""
    detail = f"{error.__class__.__name__}: {error}"
    if not isinstance(error, asyncpg.PostgresError):
        # No answer from PostgreSQL (connection refused or lost, a timeout), or no host of a
        # multi-host URL that takes writes (between a primary's loss and a promotion).
        if isinstance(
            error,
            OSError | TimeoutError | asyncpg.InterfaceError | TargetServerAttributeNotMatched,
        ):
            return TransientFailure(detail)
        return PersistentFailure(detail)
    sqlstate = getattr(error, "sqlstate", None) or ""
    detail = f"{sqlstate} {detail}"
    if sqlstate.startswith("22") or (
        sqlstate.startswith("23")
        and (getattr(error, "constraint_name", None) or getattr(error, "column_name", None))
    ):
        return DataFailure(detail, sqlstate=sqlstate)
    if sqlstate[:2] in _TRANSIENT_CLASSES or sqlstate in _TRANSIENT_STATES:
        return TransientFailure(detail, sqlstate=sqlstate)
    return PersistentFailure(detail, sqlstate=sqlstate)


class DatabaseSetupError(RuntimeError):
    """PostgreSQL refuses the daemon for a reason that waiting will not mend (a password, a
    role, a database that does not exist, a missing permission): say so, and stop."""


_SETUP_PROBLEMS = {
    "28P01": "PostgreSQL refused the password (28P01): check the user and password in DATABASE_URL",
    "28000": "PostgreSQL refused the connection (28000: {message}): check the user in "
    "DATABASE_URL, and pg_hba.conf",
    "3D000": "{message} (3D000): create it, or name another in DATABASE_URL",
    "42501": "the database user lacks a permission the daemon needs (42501: {message}): "
    "grant it, or run `energy-ingest migrate` once as a user that has it",
}


def setup_problem(error: BaseException) -> DatabaseSetupError | None:
    """The error as a DatabaseSetupError when waiting for PostgreSQL cannot help."""
    sqlstate = getattr(error, "sqlstate", None) or ""
    text = _SETUP_PROBLEMS.get(sqlstate)
    if text is None or not isinstance(error, asyncpg.PostgresError):
        return None
    return DatabaseSetupError(text.format(message=str(error).strip()))
