"""The MQTT intake over the whole input space (hypothesis): whatever a message holds, no
exception escapes, and every message ends acknowledged, its readings stored or the message
recorded as one rejection. Real PostgreSQL; the intake and the writer in this process."""

from __future__ import annotations

import asyncio
import itertools
import json
import string
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.connection import Delivery
from broker.intake import MqttIntake
from db.pool import create_pool
from db.writes import storable_text
from ingest.flushing import PoolFlush
from ingest.metrics import Metrics
from ingest.readings import Limits
from ingest.writer import Writer


def dumps(value: Any) -> bytes:
    # (The standard library's encoder: orjson refuses integers past 64 bits; devices may not.)
    return json.dumps(value).encode()


# Once stopped all MQTT ingestion: valid ISO 8601, but past year 9999 once in UTC.
POISON = {
    "meterId": "E-1",
    "kwhConsumedAc": 1.0,
    "voltage": 230.0,
    "timestamp": "9999-12-31T23:59:59-01:00",
}
WINDOW = Limits(retention=timedelta(days=30), future_skew=timedelta(seconds=300))
_ids = itertools.count()

# JSON of any shape, and the values a reading's fields could take, absurd ones included.
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.5, 230.0, 1e308, -1.0, 100.0, 1000.0]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=5),
    st.booleans(),
    st.none(),
)


def _timestamp(moment: datetime, offset_minutes: int) -> str:
    sign = "+" if offset_minutes >= 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    return moment.isoformat(timespec="seconds") + f"{sign}{hours:02d}:{minutes:02d}"


offsets = st.integers(min_value=-23 * 60, max_value=23 * 60)
timestamps = st.one_of(
    # The calendar's edges, where an offset can push a time past what UTC can hold.
    st.builds(
        lambda t, offset: _timestamp(datetime.combine(date(1, 1, 1), t), offset),
        st.times(),
        st.integers(min_value=1, max_value=23 * 60),
    ),
    st.builds(
        lambda t, offset: _timestamp(datetime.combine(date(9999, 12, 31), t), offset),
        st.times(),
        st.integers(min_value=-23 * 60, max_value=-1),
    ),
    st.builds(_timestamp, st.datetimes(), offsets),
    st.builds(
        lambda minutes: (datetime.now(UTC) - timedelta(minutes=minutes)).isoformat(),
        st.integers(min_value=-10, max_value=60 * 24 * 40),
    ),
    st.sampled_from(["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "", "now"]),
    numbers,
)


@st.composite
def readings(draw: st.DrawFn, stream: str, device: str) -> dict[str, Any]:
    id_field = "meterId" if stream == "meters" else "vehicleId"
    fields = (
        ["kwhConsumedAc", "voltage"]
        if stream == "meters"
        else ["soc", "kwhDeliveredDc", "batteryTemp"]
    )
    reading: dict[str, Any] = {
        id_field: draw(st.sampled_from([device, device, device, "someone-else"])),
        "timestamp": draw(timestamps),
    }
    for name in fields:
        reading[name] = draw(numbers)
    if draw(st.booleans()):
        reading.pop(draw(st.sampled_from(sorted(reading))))
    return reading


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes]:
    n = next(_ids)
    stream = draw(st.sampled_from(["meters", "vehicles"]))
    device = f"P{n}-" + draw(st.text(string.ascii_letters + "._:-", max_size=8))
    topic = draw(
        st.one_of(
            st.just(f"{stream}/{device}/telemetry"),
            st.text(max_size=30).map(lambda t: f"{t}/{n}"),
            st.just(f"{stream}/{device} x/telemetry"),
        )
    )
    payload = draw(
        st.one_of(
            readings(stream, device).map(dumps),
            readings(stream, device).map(dumps),
            st.lists(readings(stream, device), max_size=6).map(dumps),
            json_values.map(dumps),
            st.binary(max_size=200),
            st.lists(st.integers(0, 1), min_size=1, max_size=500).map(dumps),
        )
    )
    return topic, payload


class Acks:
    """The connection a delivery is acknowledged on: here, a list of what was acked."""

    def __init__(self, acked: list[Delivery]) -> None:
        self.acked = acked

    def acknowledge(self, delivery: Delivery) -> None:
        self.acked.append(delivery)


async def run_intake(db_url: str, batch: list[tuple[str, bytes]]) -> list[Delivery]:
    pool = await create_pool(db_url, schema="public", max_size=2)
    writer = Writer(
        PoolFlush(pool),
        flush_max_readings=100,
        flush_interval_s=0.001,
        buffer_max_readings=100_000,
        metrics=Metrics(),
    )
    acked: list[Delivery] = []
    channel = Acks(acked)
    intake = MqttIntake(writer=writer, limits=WINDOW, payload_max_bytes=256)
    task = asyncio.create_task(writer.run())
    try:
        for packet_id, (topic, payload) in enumerate(batch, start=1):
            intake(Delivery(topic, payload, 1, packet_id, 1, channel))
        async with asyncio.timeout(20):
            while len(acked) < len(batch):
                await asyncio.sleep(0.005)
    finally:
        writer.stop()
        await task
        await pool.close()
    return acked


async def outcome_of(conn: asyncpg.Connection, topic: str) -> tuple[int, int]:
    """(readings stored, rejection rows) for the message published on `topic`."""
    rejected = await conn.fetchval(
        "SELECT count(*) FROM rejections WHERE topic_or_route = $1", storable_text(topic)
    )
    parts = topic.split("/")
    stored = 0
    if len(parts) == 3 and parts[0] in ("meters", "vehicles"):
        table, column = (
            ("meter_readings", "meter_id")
            if parts[0] == "meters"
            else ("vehicle_readings", "vehicle_id")
        )
        stored = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", parts[1])
    return stored, rejected


@settings(
    max_examples=60,
    deadline=None,
    # One database for every example: each message names devices of its own.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(batch=st.lists(messages(), min_size=1, max_size=40))
@example(batch=[("meters/E-1/telemetry", dumps(POISON))])
def test_every_message_ends_acked_as_stored_or_rejected(
    db_url: str, batch: list[tuple[str, bytes]]
) -> None:
    acked = asyncio.run(run_intake(db_url, batch))
    assert sorted(d.packet_id for d in acked) == list(range(1, len(batch) + 1))

    async def check() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            for topic, payload in batch:
                stored, rejected = await outcome_of(conn, topic)
                assert stored or rejected, (topic, payload[:200])
                assert rejected <= 1, topic  # one record per message, whatever it holds
        finally:
            await conn.close()

    asyncio.run(check())
