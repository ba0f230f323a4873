"""The database as more than one server (SPEC §7, high availability): a primary with a
synchronous streaming standby, real replication started by the tests. The primary killed
(SIGKILL) in the middle of MQTT and HTTP load, then the standby promoted; a planned
switchover; a node that takes no writes (25006); operators' reads on a replica, with its lag
reported. Each ends with exact counts: every acknowledged reading stored once."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.services import EmbeddedMosquitto, EmbeddedPostgres
from tests.conftest import fresh_database
from tests.helpers import eventually, meter_json, minutes_ago, vehicle_json
from tests.replication import Pair, follow, kill_hard, promote, replicated_postgres, wait_replayed
from tests.services import DaemonProcess, Publisher
from tests.streams import (
    BackgroundPublisher,
    assert_rollups_match_history,
    stream_of_readings,
)


class HttpPoster(threading.Thread):
    """A legacy device posting readings one by one, each until it gets its 201 (a 503 or a
    lost connection is retried after a pause, as firmware does)."""

    def __init__(self, base_url: str, bodies: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.bodies = bodies
        self.stored = 0
        self.refused = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.base_url, timeout=30) as client:
                for body in self.bodies:
                    while True:
                        try:
                            answer = client.post("/v1/ingestion/vehicle", content=body)
                        except httpx.HTTPError:
                            time.sleep(0.2)
                            continue
                        if answer.status_code == 201:
                            self.stored += 1
                            break
                        assert answer.status_code == 503, answer.text
                        assert "Retry-After" in answer.headers
                        self.refused += 1
                        time.sleep(0.2)
        except BaseException as error:  # reported by the test
            self.error = error


def vehicle_bodies(prefix: str, count: int) -> list[bytes]:
    return [vehicle_json(f"{prefix}-v{n % 10}", minutes_ago(30 - n * 0.01)) for n in range(count)]


async def counts(dsn: str, prefix: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM meter_readings WHERE meter_id LIKE $1) AS meters,
                      (SELECT coalesce(sum(kwh_consumed_ac), 0) FROM meter_readings
                       WHERE meter_id LIKE $1) AS kwh,
                      (SELECT count(*) FROM vehicle_readings WHERE vehicle_id LIKE $1) AS vehicles,
                      (SELECT count(*) FROM rejections) AS rejections""",
            prefix + "-%",
        )
        return dict(row)
    finally:
        await conn.close()


async def all_stored(dsn: str, prefix: str, meters: int, vehicles: int) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        try:
            found = await counts(dsn, prefix)
        except (OSError, asyncpg.PostgresError):
            return None
        return found if found["meters"] >= meters and found["vehicles"] >= vehicles else None

    return await eventually(done, timeout_s=120, interval_s=0.2)


async def health(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        answer = await client.get(daemon.base_url + "/health", timeout=5)
    return answer.status_code, answer.json()


async def seconds_until_healthy(daemon: DaemonProcess, since: float) -> float:
    async def ok() -> bool:
        return (await health(daemon))[0] == 200

    await eventually(ok, timeout_s=60, interval_s=0.1)
    return time.monotonic() - since


def failover_daemon(pair: Pair, mosquitto: EmbeddedMosquitto) -> DaemonProcess:
    # Partition upkeep every 2 s: it runs (and fails) while there is no primary, and must be
    # tried again until it works, not at its next round.
    return DaemonProcess(
        database_url=pair.url(),
        mqtt_url=mosquitto.url,
        upkeep_interval_s=2,
        http_commit_timeout_s=3,
    ).start()


@pytest.mark.soak
async def test_a_primary_killed_mid_load_fails_over_to_its_synchronous_standby_losing_nothing(
    mosquitto: EmbeddedMosquitto, record: Callable[..., None]
) -> None:
    async with replicated_postgres(synchronous=True) as pair:
        daemon = failover_daemon(pair, mosquitto)
        prefix = f"FO{uuid.uuid4().hex[:6]}"
        messages = stream_of_readings(prefix, per_meter=60)
        publisher = BackgroundPublisher(mosquitto.port, messages)
        poster = HttpPoster(daemon.base_url, vehicle_bodies(prefix, 300))
        try:
            publisher.start()
            poster.start()
            while (await counts(pair.primary.dsn, prefix))["meters"] < len(messages) // 4:
                await asyncio.sleep(0.05)
            kill_hard(pair.primary)
            killed_at = time.monotonic()
            await asyncio.sleep(3)
            status, during = await health(daemon)
            assert status == 503, during  # no primary: readings held, nothing acknowledged
            promote(pair.standby)
            promoted_at = time.monotonic()
            found = await all_stored(pair.standby.dsn, prefix, len(messages), 300)
            stored_s = time.monotonic() - promoted_at
            publisher.join(120)
            poster.join(120)
            assert publisher.error is None and poster.error is None, (publisher.error, poster.error)
            found = await counts(pair.standby.dsn, prefix)
            assert found["meters"] == len(messages)
            assert found["vehicles"] == poster.stored == 300
            assert found["kwh"] == pytest.approx(sum(k for _, _, k in messages))
            assert found["rejections"] == 0
            healthy_s = await seconds_until_healthy(daemon, promoted_at)
            conn = await asyncpg.connect(pair.standby.dsn)
            try:
                await assert_rollups_match_history(conn)
            finally:
                await conn.close()
            assert daemon.process is not None and daemon.process.poll() is None  # no restart
            record(
                mqtt_sent=len(messages),
                http_sent=300,
                stored=found["meters"] + found["vehicles"],
                lost=len(messages) + 300 - found["meters"] - found["vehicles"],
                http_503_while_no_primary=poster.refused,
                no_primary_s=round(promoted_at - killed_at, 1),
                all_stored_after_promotion_s=round(stored_s, 1),
                health_green_after_promotion_s=round(healthy_s, 1),
                health_during=during["database"]["detail"][:120],
            )
        finally:
            assert daemon.stop() == 0, daemon.log()


@pytest.mark.soak
async def test_a_planned_switchover_loses_nothing(
    mosquitto: EmbeddedMosquitto, record: Callable[..., None]
) -> None:
    """The primary stopped cleanly, the standby promoted, the old primary back as a standby
    of the new one (read-only: the daemon's URL still names it first, and passes it by)."""
    async with replicated_postgres(synchronous=True) as pair:
        daemon = failover_daemon(pair, mosquitto)
        prefix = f"SW{uuid.uuid4().hex[:6]}"
        messages = stream_of_readings(prefix, per_meter=40)
        publisher = BackgroundPublisher(mosquitto.port, messages)
        poster = HttpPoster(daemon.base_url, vehicle_bodies(prefix, 200))
        try:
            publisher.start()
            poster.start()
            while (await counts(pair.primary.dsn, prefix))["meters"] < len(messages) // 4:
                await asyncio.sleep(0.05)
            switched_at = time.monotonic()
            assert pair.primary.pg_ctl("-m", "fast", "-w", "stop").returncode == 0
            promote(pair.standby)
            follow(pair.primary, pair.standby.port)
            pair.primary.start()
            found = await all_stored(pair.standby.dsn, prefix, len(messages), 200)
            publisher.join(120)
            poster.join(120)
            assert publisher.error is None and poster.error is None
            found = await counts(pair.standby.dsn, prefix)
            assert (found["meters"], found["vehicles"]) == (len(messages), 200)
            assert found["kwh"] == pytest.approx(sum(k for _, _, k in messages))
            assert found["rejections"] == 0
            healthy_s = await seconds_until_healthy(daemon, switched_at)
            old_primary = await asyncpg.connect(pair.primary.dsn)
            try:
                assert await old_primary.fetchval("SELECT pg_is_in_recovery()")
            finally:
                await old_primary.close()
            record(
                sent=len(messages) + 200,
                stored=found["meters"] + found["vehicles"],
                health_green_after_switchover_s=round(healthy_s, 1),
                http_503_during_switchover=poster.refused,
            )
        finally:
            assert daemon.stop() == 0, daemon.log()


@pytest.mark.soak
async def test_a_read_only_node_holds_readings_and_never_rejects_them(
    postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto, record: Callable[..., None]
) -> None:
    """Writes meet 25006 (the database set read-only, as a provider does when its disk fills,
    or a standby behind the URL): the database's fault, so the readings are held, never
    acknowledged and never recorded as rejections, and stored once writes work again."""
    url = await fresh_database(postgres)
    name = url.rsplit("/", 1)[1]
    daemon = DaemonProcess(database_url=url, mqtt_url=mosquitto.url, http_commit_timeout_s=2)
    daemon.start()
    admin = await asyncpg.connect(url)
    drop_writers = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = $1 AND application_name = 'energy-ingest-write'"
    )
    try:
        await admin.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
        await admin.fetchval(drop_writers, name)
        prefix = f"RO{uuid.uuid4().hex[:6]}"
        messages = stream_of_readings(prefix, per_meter=4)
        publisher = Publisher(mosquitto.port)
        publisher.publish_all([(topic, payload) for topic, payload, _ in messages])
        publisher.close()
        answer = httpx.post(
            daemon.base_url + "/v1/ingestion/meter",
            content=meter_json(f"{prefix}-h", minutes_ago(1)),
            timeout=10,
        )
        assert answer.status_code == 503, answer.text
        # Refused at once (the writer knew writes fail), or after waiting for its commit: then
        # it stays in the buffer and is stored once writes work (a retry would be a duplicate).
        kept = 1 if "no commit within" in answer.text else 0

        async def refusing() -> dict[str, Any] | None:
            status, body = await health(daemon)
            return body if status == 503 and "25006" in body["database"]["detail"] else None

        said = await eventually(refusing, timeout_s=30)
        assert said["database"]["state"] == "refusing writes"
        assert (await counts(url, prefix))["meters"] == 0
        await admin.execute(f"ALTER DATABASE {name} RESET default_transaction_read_only")
        found = await all_stored(url, prefix, len(messages) + kept, 0)
        assert found["meters"] == len(messages) + kept
        assert found["rejections"] == 0
        metrics = httpx.get(daemon.base_url + "/metrics", timeout=5).text
        assert 'outcome="rejected"' not in metrics
        await seconds_until_healthy(daemon, time.monotonic())
        record(
            sent=len(messages) + kept,
            stored=found["meters"],
            health_said=said["database"]["detail"],
        )
    finally:
        await admin.execute(f"ALTER DATABASE {name} RESET default_transaction_read_only")
        await admin.close()
        assert daemon.stop() == 0, daemon.log()


def replica_gauges(daemon: DaemonProcess) -> dict[str, float]:
    """The replica's samples in the daemon's /metrics."""
    text = httpx.get(daemon.base_url + "/metrics", timeout=5).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("energy_ingest_replica_")
        for sample in family.samples
    }


async def test_reads_go_to_the_replica_and_its_lag_is_reported(
    mosquitto: EmbeddedMosquitto,
) -> None:
    async with replicated_postgres(synchronous=False) as pair:
        daemon = DaemonProcess(
            database_url=pair.primary.dsn,
            mqtt_url=mosquitto.url,
            database_read_url=pair.standby.dsn,
        ).start()
        meter = f"RM-{uuid.uuid4().hex[:6]}"
        standby = await asyncpg.connect(pair.standby.dsn)
        try:
            first = minutes_ago(2)
            post = httpx.post(
                daemon.base_url + "/v1/ingestion/meter",
                content=meter_json(meter, first, kwh=1.0),
                timeout=10,
            )
            assert post.status_code == 201
            await wait_replayed(pair.primary.dsn, pair.standby.dsn)
            status = daemon.get(f"/v1/status/meter/{meter}")
            assert status.status_code == 200 and status.json()["kwhConsumedAc"] == 1.0
            code, body = await health(daemon)
            assert code == 200 and body["replica"]["ok"], body
            readers = await standby.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                "'energy-ingest-read'"
            )
            assert readers >= 1  # the status was read there

            await standby.execute("SELECT pg_wal_replay_pause()")
            newer = minutes_ago(1)
            post = httpx.post(
                daemon.base_url + "/v1/ingestion/meter",
                content=meter_json(meter, newer, kwh=2.0),
                timeout=10,
            )
            assert post.status_code == 201  # the primary took it

            async def lagging() -> dict[str, Any] | None:
                code, body = await health(daemon)
                lag = body["replica"]["lagSeconds"]
                return body if code == 200 and lag is not None and lag >= 1.0 else None

            lagged = await eventually(lagging, timeout_s=30)
            overview = daemon.get("/v1/overview").json()
            assert overview["replica"]["lagSeconds"] >= 1.0
            scraped = replica_gauges(daemon)
            assert scraped["energy_ingest_replica_up"] == 1.0
            assert scraped["energy_ingest_replica_lag_seconds"] >= 1.0
            assert daemon.get(f"/v1/status/meter/{meter}").json()["kwhConsumedAc"] == 1.0

            await standby.execute("SELECT pg_wal_replay_resume()")

            async def caught_up() -> bool:
                body = daemon.get(f"/v1/status/meter/{meter}").json()
                lag = (await health(daemon))[1]["replica"]["lagSeconds"]
                return body["kwhConsumedAc"] == 2.0 and lag is not None and lag < 1.0

            await eventually(caught_up, timeout_s=30)
            assert lagged["replica"]["state"] == "up"
            assert replica_gauges(daemon)["energy_ingest_replica_lag_seconds"] < 1.0

            # Cut off from its primary, the replica has nothing left to replay: its lag is
            # then the age of what it last replayed, not 0.
            await standby.execute("ALTER SYSTEM SET primary_conninfo = ''")
            await standby.execute("SELECT pg_reload_conf()")

            async def cut_off() -> dict[str, float] | None:
                scraped = replica_gauges(daemon)
                lag = scraped.get("energy_ingest_replica_lag_seconds", 0.0)
                return scraped if lag >= 2.0 else None

            assert (await eventually(cut_off, timeout_s=30))["energy_ingest_replica_up"] == 1.0

            await standby.close()
            pair.standby.stop()  # (the primary stays: ingestion goes on)

            async def replica_down() -> dict[str, float] | None:
                scraped = replica_gauges(daemon)
                return scraped if scraped.get("energy_ingest_replica_up") == 0.0 else None

            down = await eventually(replica_down, timeout_s=30)
            assert "energy_ingest_replica_lag_seconds" not in down
            post = httpx.post(
                daemon.base_url + "/v1/ingestion/meter",
                content=meter_json(meter, minutes_ago(0.5), kwh=3.0),
                timeout=10,
            )
            assert post.status_code == 201
        finally:
            await standby.close()
            assert daemon.stop() == 0, daemon.log()
