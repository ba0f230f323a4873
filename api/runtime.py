"""What the HTTP side sees of a running daemon: its pools, the writer and the state of each
link (database, replica, broker, partition upkeep)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from db.probe import DatabaseStatus
from ingest.config import Settings
from ingest.housekeeping import UpkeepStatus
from ingest.readings import Limits
from ingest.writer import Writer


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    ready: bool  # connected, and every subscription granted at the QoS asked for
    detail: str


@dataclass(slots=True)
class Runtime:
    settings: Settings
    writer: Writer
    limits: Limits
    read_pool: asyncpg.Pool  # operators' reads (the replica's, when there is one)
    control_pool: asyncpg.Pool  # the primary's, for links
    broker_status: Callable[[], BrokerStatus]
    upkeep_status: Callable[[], UpkeepStatus]
    database_status: Callable[[], DatabaseStatus]
    replica_status: Callable[[], DatabaseStatus | None] = lambda: None
