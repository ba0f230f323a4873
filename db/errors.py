"""How a database failure is handled, decided by SQLSTATE class, never by message text.

DatabaseFailure
 ├── TransientFailure  connection lost, server shutting down, serialization or deadlock:
 │                     retry the same work after a back-off
 └── DataFailure       a row the database refuses (classes 22 and 23): split the batch
                       to find it, reject it, keep the rest
"""

from __future__ import annotations

import asyncpg

_DATA_CLASSES = ("22", "23")


class DatabaseFailure(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class TransientFailure(DatabaseFailure):
    pass


class DataFailure(DatabaseFailure):
    pass


def classify(error: BaseException) -> DatabaseFailure:
    """Map an exception raised while talking to PostgreSQL onto how to handle it.

    Anything that is not a refused row (connection lost, timeouts, server errors, and
    surprises) is retried: holding on to readings is better than dropping them.
    """
    detail = f"{error.__class__.__name__}: {error}"
    if isinstance(error, asyncpg.PostgresError):
        sqlstate = getattr(error, "sqlstate", None) or ""
        detail = f"{sqlstate} {detail}"
        if sqlstate[:2] in _DATA_CLASSES:
            return DataFailure(detail)
    return TransientFailure(detail)
