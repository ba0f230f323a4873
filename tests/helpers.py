"""Readings as devices send them, and waiting for things that happen eventually."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import orjson

T = TypeVar("T")


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def minutes_ago(minutes: float) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=minutes)


def meter_json(meter_id: str, at: datetime, kwh: float = 1.2, voltage: float = 230.0) -> bytes:
    return orjson.dumps(
        {"meterId": meter_id, "kwhConsumedAc": kwh, "voltage": voltage, "timestamp": iso(at)}
    )


def vehicle_json(
    vehicle_id: str, at: datetime, soc: float = 50.0, kwh: float = 1.0, temp: float = 25.0
) -> bytes:
    return orjson.dumps(
        {
            "vehicleId": vehicle_id,
            "soc": soc,
            "kwhDeliveredDc": kwh,
            "batteryTemp": temp,
            "timestamp": iso(at),
        }
    )


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, timeout_s: float = 20.0, interval_s: float = 0.05
) -> T:
    """Await `probe` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"not reached within {timeout_s} s; last value {last!r}")
