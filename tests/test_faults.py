"""Faults of the database, the daemon and its neighbours, with real processes and a stream of
QoS 1 readings: each ends with exact counts and energy sums (nothing lost, nothing counted
twice) and with what /health said while it lasted."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from daemon.services import EmbeddedMosquitto, EmbeddedPostgres
from tests.conftest import fresh_database
from tests.helpers import eventually, meter_json, minutes_ago, vehicle_json
from tests.services import DaemonProcess, Publisher, running_mosquitto
from tests.streams import (
    BackgroundPublisher,
    stored,
    stream_of_readings,
    tally,
    wait_until_all_stored,
)

REFUSE_CREATE_TABLE = """
CREATE FUNCTION refuse_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'no new tables (a test)' USING ERRCODE = '42501'; END $$;
CREATE EVENT TRIGGER refuse_create ON ddl_command_start WHEN TAG IN ('CREATE TABLE')
    EXECUTE FUNCTION refuse_ddl()"""

FAIL_METER_INSERTS = """
CREATE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'injected failure' USING ERRCODE = '{sqlstate}'; END $$;
CREATE TRIGGER fail_insert BEFORE INSERT ON meter_readings
    FOR EACH ROW EXECUTE FUNCTION fail_insert()"""


async def mended(conn: asyncpg.Connection, ddl: str) -> None:
    """DDL against the daemon's retries: PostgreSQL may pick it as a deadlock's victim (the
    flush holds a partition, the DROP the parent): try again, as an operator would."""
    for _ in range(10):
        try:
            await conn.execute(ddl)
            return
        except asyncpg.DeadlockDetectedError:
            await asyncio.sleep(0.2)
    await conn.execute(ddl)


def prefix_for(kind: str) -> str:
    return f"{kind}{uuid.uuid4().hex[:6]}"


async def health(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(daemon.base_url + "/health", timeout=5)
    return response.status_code, response.json()


async def health_saying(daemon: DaemonProcess, part: str, *words: str) -> dict[str, Any]:
    async def matches() -> dict[str, Any] | None:
        status, body = await health(daemon)
        detail = body[part]["detail"]
        return body if status == 503 and all(w in detail for w in words) else None

    return await eventually(matches, timeout_s=30)


async def healthy(daemon: DaemonProcess) -> None:
    async def ok() -> bool:
        return (await health(daemon))[0] == 200

    await eventually(ok, timeout_s=40)


def log_lines(daemon: DaemonProcess, words: str) -> int:
    return sum(words in line for line in daemon.log_path.read_text().splitlines())


async def post_all(daemon: DaemonProcess, bodies: list[bytes]) -> list[int]:
    async with httpx.AsyncClient(base_url=daemon.base_url, timeout=30) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/ingestion/meter", content=body) for body in bodies)
        )
    return [a.status_code for a in answers]


@pytest.mark.soak
async def test_missing_partitions_hold_readings_unacked_until_upkeep_works_again(
    postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto, record: Callable[..., None]
) -> None:
    url = await fresh_database(postgres)
    daemon = DaemonProcess(
        database_url=url, mqtt_url=mosquitto.url, upkeep_interval_s=2, http_commit_timeout_s=2
    ).start()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(REFUSE_CREATE_TABLE)
        today = datetime.now(UTC).date()
        for day in (today, today - timedelta(days=1)):
            await conn.execute(f"DROP TABLE meter_readings_p{day:%Y%m%d}")
        prefix = prefix_for("PM")
        messages = stream_of_readings(prefix, per_meter=20)
        publisher = BackgroundPublisher(mosquitto.port, messages)
        publisher.start()
        over_http = [meter_json(f"{prefix}-h{n}", minutes_ago(1), kwh=0.5) for n in range(10)]
        answers = await post_all(daemon, over_http)
        assert set(answers) == {503}, answers  # not stored yet: told to come back

        body = await health_saying(daemon, "database", "held back", "23514", "no partition")
        assert "partition upkeep failing" in body["partitions"]["detail"]
        vehicle = httpx.post(
            daemon.base_url + "/v1/ingestion/vehicle",
            content=vehicle_json(f"{prefix}-v", minutes_ago(1)),
            timeout=10,
        )
        assert vehicle.status_code == 201  # what has a partition is written meanwhile
        publisher.join(60)
        assert publisher.error is None
        assert (await stored(url, prefix))[0] == 0

        await conn.execute("DROP EVENT TRIGGER refuse_create")
        expected = len(messages) + len(over_http)
        assert await wait_until_all_stored(url, prefix, expected) == expected
        _, kwh = await stored(url, prefix)
        assert kwh == pytest.approx(sum(k for _, _, k in messages) + 0.5 * len(over_http))
        await healthy(daemon)
        assert log_lines(daemon, "PostgreSQL refused a flush (23514") == 1
        as_sent = messages + [("(http)", body, 0.5) for body in over_http]
        record(
            **await tally(url, prefix, as_sent),
            sent_over_http=len(over_http),
            health_said=body["database"]["detail"][:160],
        )
    finally:
        await conn.close()
        assert daemon.stop() == 0, daemon.log()


@pytest.mark.soak
@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("53100", "TransientFailure"),  # disk full
        ("42501", "PersistentFailure"),  # permission denied
        ("XX000", "PersistentFailure"),  # internal error
    ],
)
async def test_postgresql_refusing_every_write_for_its_own_reason_loses_nothing(
    postgres: EmbeddedPostgres,
    mosquitto: EmbeddedMosquitto,
    sqlstate: str,
    kind: str,
    record: Callable[..., None],
) -> None:
    url = await fresh_database(postgres)
    daemon = DaemonProcess(database_url=url, mqtt_url=mosquitto.url).start()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(FAIL_METER_INSERTS.format(sqlstate=sqlstate))
        prefix = prefix_for("PF")
        messages = stream_of_readings(prefix, per_meter=10)
        publisher = Publisher(mosquitto.port)
        publisher.publish_all([(topic, payload) for topic, payload, _ in messages])
        publisher.close()
        said = await health_saying(daemon, "database", sqlstate, "injected failure")
        metrics = httpx.get(daemon.base_url + "/metrics", timeout=5).text
        assert f'energy_ingest_flush_failures_total{{cause="{sqlstate}",kind="{kind}"}}' in metrics
        assert (await stored(url, prefix))[0] == 0
        assert await conn.fetchval("SELECT count(*) FROM rejections") == 0

        await mended(conn, "DROP TRIGGER fail_insert ON meter_readings")
        assert await wait_until_all_stored(url, prefix, len(messages)) == len(messages)
        _, kwh = await stored(url, prefix)
        assert kwh == pytest.approx(sum(k for _, _, k in messages))
        await healthy(daemon)
        assert log_lines(daemon, f"PostgreSQL refused a flush ({sqlstate}") == 1
        record(**await tally(url, prefix, messages), health_said=said["database"]["detail"][:160])
    finally:
        await conn.close()
        assert daemon.stop() == 0, daemon.log()


@pytest.mark.soak
async def test_sigterm_under_load_ends_within_its_deadline_and_loses_nothing(
    postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto, record: Callable[..., None]
) -> None:
    """Flushes blocked (a lock held on the history): SIGTERM still ends the daemon within
    SHUTDOWN_TIMEOUT_S; what it could not commit it never acknowledged, and the broker
    delivers it again to the next start."""
    url = await fresh_database(postgres)
    client_id = f"sigterm-{uuid.uuid4().hex[:6]}"
    daemon = DaemonProcess(
        database_url=url, mqtt_url=mosquitto.url, shutdown_timeout_s=3, mqtt_client_id=client_id
    ).start()
    blocker = await asyncpg.connect(url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("LOCK TABLE meter_readings IN ACCESS EXCLUSIVE MODE")
    prefix = prefix_for("ST")
    messages = stream_of_readings(prefix, per_meter=10)
    try:
        publisher = Publisher(mosquitto.port)
        publisher.publish_all([(topic, payload) for topic, payload, _ in messages])
        publisher.close()
        await asyncio.sleep(0.5)
        assert daemon.process is not None
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(daemon.process.wait, 30)
        elapsed = time.monotonic() - started
        assert code == 0, daemon.log()
        assert elapsed < 3 + 2.0, elapsed  # the deadline, and the process's own exit
        assert "shutdown deadline" in daemon.log()
    finally:
        await transaction.rollback()
        await blocker.close()
    daemon.start()
    try:
        assert await wait_until_all_stored(url, prefix, len(messages)) == len(messages)
        record(**await tally(url, prefix, messages), deadline_s=3, stopped_in_s=round(elapsed, 2))
    finally:
        assert daemon.stop() == 0, daemon.log()


@pytest.mark.soak
async def test_three_daemons_sharing_a_group_one_killed_mid_stream(
    postgres: EmbeddedPostgres, record: Callable[..., None]
) -> None:
    """Every reading stored once; the two others carry on while the third is down; partition
    upkeep and retention run in all three at once (every second), safely."""
    url = await fresh_database(postgres)
    with running_mosquitto() as broker:
        daemons = [
            DaemonProcess(
                database_url=url,
                mqtt_url=broker.url,
                mqtt_shared_group="trio",
                upkeep_interval_s=1,
            ).start()
            for _ in range(3)
        ]
        prefix = prefix_for("TR")
        messages = stream_of_readings(prefix, per_meter=60)
        publisher = BackgroundPublisher(broker.port, messages)
        publisher.start()
        try:
            while publisher.sent < len(messages) // 3:
                await asyncio.sleep(0.01)
            daemons[0].kill()
            at_kill = (await stored(url, prefix))[0]
            while publisher.sent < 2 * len(messages) // 3:
                await asyncio.sleep(0.01)
            await asyncio.sleep(1)
            assert (await stored(url, prefix))[0] > at_kill  # the other two carry on
            publisher.join(120)
            assert publisher.error is None
            # The killed one's unacknowledged messages wait in its session until it is back.
            daemons[0].start()
            assert await wait_until_all_stored(url, prefix, len(messages)) == len(messages)
            _, kwh = await stored(url, prefix)
            assert kwh == pytest.approx(sum(k for _, _, k in messages))
            for daemon in daemons:
                assert "partition upkeep failing" not in daemon.log()
            record(**await tally(url, prefix, messages), stored_when_killed=at_kill)
        finally:
            for daemon in daemons:
                assert daemon.stop() == 0, daemon.log()
