"""Streams of readings published while something goes wrong, and what they left stored:
shared by the durability and fault tests."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import asyncpg

from db.rollup import fold
from db.tables import METER, VEHICLE
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
    twice (the history's key forbids it; the energy sum would show it), energy off by; and
    checks that the hourly roll-ups of these meters count every stored reading once."""
    n, kwh = await stored(url, prefix)
    conn = await asyncpg.connect(url)
    try:
        await assert_rollups_match_history(conn, [f"{prefix}-{m:03d}" for m in range(METERS)], [])
    finally:
        await conn.close()
    sent_kwh = sum(k for _, _, k in messages)
    return {
        "sent": len(messages),
        "stored": n,
        "lost": len(messages) - n,
        "energy_kwh_sent": round(sent_kwh, 6),
        "energy_kwh_off_by": round(kwh - sent_kwh, 9),
    }


ROLLUPS_AGAINST_HISTORY = """
WITH raw AS (
    SELECT {id} AS id, date_trunc('hour', ts, 'UTC') AS hour, sum({kwh}) AS kwh, count(*) AS n
    FROM {history} WHERE ($1::text[] IS NULL OR {id} = ANY($1)) GROUP BY 1, 2
), rolled AS (
    SELECT {id} AS id, hour, sum({kwh}) AS kwh, sum(readings) AS n
    FROM {hourly} WHERE ($1::text[] IS NULL OR {id} = ANY($1)) GROUP BY 1, 2
)
SELECT count(*) FROM raw FULL JOIN rolled USING (id, hour)
WHERE raw.n IS DISTINCT FROM rolled.n
   OR abs(coalesce(raw.kwh, 0) - coalesce(rolled.kwh, 0)) > 1e-6"""


async def assert_rollups_match_history(
    conn: asyncpg.Connection, meters: list[str] | None = None, vehicles: list[str] | None = None
) -> None:
    """Every stored reading counted exactly once in its device's hour: no hour of the roll-ups
    (of these devices, or of all) differs from the history summed again. Checked as readers
    see them (roll-ups and deltas not yet folded together), then again once every delta is
    folded in (the roll-ups alone)."""
    await compare_rollups(conn, "hourly_all", meters, vehicles)
    await _fold_everything(conn)
    await compare_rollups(conn, "hourly", meters, vehicles)


async def compare_rollups(
    conn: asyncpg.Connection, kind: str, meters: list[str] | None, vehicles: list[str] | None
) -> None:
    for t, kwh, devices in (
        (METER, "kwh_consumed_ac", meters),
        (VEHICLE, "kwh_delivered_dc", vehicles),
    ):
        hourly = getattr(t, kind)
        sql = ROLLUPS_AGAINST_HISTORY.format(
            id=t.id_column, kwh=kwh, history=t.history, hourly=hourly
        )
        differing = await conn.fetchval(sql, devices)
        assert differing == 0, f"{hourly}: {differing} hours differ from {t.history}"


async def _fold_everything(conn: asyncpg.Connection) -> None:
    """Fold until no delta is left (a daemon still running may be folding too)."""

    async def folded() -> bool:
        await fold(conn, schema="public", oldest_hour=datetime(2000, 1, 1, tzinfo=UTC))
        left = [await conn.fetchval(f"SELECT count(*) FROM {t.deltas}") for t in (METER, VEHICLE)]
        return left == [0, 0]

    await eventually(folded, timeout_s=10)
