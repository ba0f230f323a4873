"""What the HTTP side sees of a running daemon: the pool, the writer and the broker link."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from daemon.config import Settings
from daemon.readings import Limits
from daemon.upkeep import UpkeepStatus
from daemon.writer import Writer


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    ready: bool  # connected, and every subscription granted at the QoS asked for
    detail: str


@dataclass(slots=True)
class Runtime:
    settings: Settings
    pool: asyncpg.Pool
    writer: Writer
    limits: Limits
    broker_status: Callable[[], BrokerStatus]
    upkeep_status: Callable[[], UpkeepStatus]
