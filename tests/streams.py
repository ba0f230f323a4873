"""Streams of readings published while something goes wrong, and what they left stored:
shared by the durability and fault tests."""

from __future__ import annotations

import threading
from datetime import timedelta

import asyncpg

from tests.helpers import eventually, meter_json, minutes_ago
from tests.services import Publisher

METERS = 50


def stream_of_readings(prefix: str, per_meter: int) -> list[tuple[str, bytes, float]]:
    start = minutes_ago(per_meter + 1)
    messages = []
    for minute in range(per_meter):
        at = start + timedelta(minutes=minute)
        for m in range(METERS):
            meter = f"{prefix}-{m:03d}"
            kwh = round(0.01 * (m + 1) + 0.001 * minute, 6)
            messages.append((f"meters/{meter}/telemetry", meter_json(meter, at, kwh=kwh), kwh))
    return messages


class BackgroundPublisher(threading.Thread):
    def __init__(self, port: int, messages: list[tuple[str, bytes, float]]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.messages = messages
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            publisher = Publisher(self.port)
            for start in range(0, len(self.messages), 250):
                chunk = self.messages[start : start + 250]
                publisher.publish_all([(topic, payload) for topic, payload, _ in chunk])
                self.sent += len(chunk)
            publisher.close()
        except BaseException as error:  # reported by the test
            self.error = error


async def stored(url: str, prefix: str) -> tuple[int, float]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, coalesce(sum(kwh_consumed_ac), 0) AS kwh "
            "FROM meter_readings WHERE meter_id LIKE $1",
            prefix + "-%",
        )
        return row["n"], row["kwh"]
    finally:
        await conn.close()


async def wait_until_all_stored(url: str, prefix: str, expected: int, timeout_s: float = 90) -> int:
    """Wait for `expected` readings of `prefix`; returns how many are stored (more = bug)."""

    async def enough() -> bool:
        return (await stored(url, prefix))[0] >= expected

    await eventually(enough, timeout_s=timeout_s)
    return (await stored(url, prefix))[0]


async def tally(
    url: str, prefix: str, messages: list[tuple[str, bytes, float]]
) -> dict[str, float]:
    """What a stream left behind, for the reliability report: sent, stored, lost, stored
    twice (the history's key forbids it; the energy sum would show it), energy off by."""
    n, kwh = await stored(url, prefix)
    sent_kwh = sum(k for _, _, k in messages)
    return {
        "sent": len(messages),
        "stored": n,
        "lost": len(messages) - n,
        "energy_kwh_sent": round(sent_kwh, 6),
        "energy_kwh_off_by": round(kwh - sent_kwh, 9),
    }
