"""PostgreSQL as managed services offer it (SPEC §8): TLS only (`sslmode=verify-full` with a
CA), and behind a pooler in transaction mode (Debian's PgBouncer, as managed poolers run),
which keeps no session for a client: DB_POOLER=transaction."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import trustme

from daemon.services import EmbeddedMosquitto, EmbeddedPostgres, ServerTls
from tests.helpers import eventually, meter_json, minutes_ago, vehicle_json
from tests.services import DaemonProcess, PgBouncer, Publisher, service_root

DATABASE = "energy"


class Pki:
    def __init__(self, folder: Path) -> None:
        ca = trustme.CA()
        server = ca.issue_cert("localhost")
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(ca.cert_pem.bytes())
        self.cert = folder / "server.crt"
        self.cert.write_bytes(server.cert_chain_pems[0].bytes())
        self.key = folder / "server.key"
        self.key.write_bytes(server.private_key_pem.bytes())


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki(service_root("pg-pki"))


@pytest.fixture(scope="module")
def tls_postgres(pki: Pki) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(
        service_root("pg-tls") / "postgres", port=0, fsync=False, tls=ServerTls(pki.cert, pki.key)
    )
    pg.start()
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def pgbouncer(tls_postgres: EmbeddedPostgres, pki: Pki) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(
        service_root("pgbouncer") / "pgbouncer",
        pg_port=tls_postgres.port,
        database=DATABASE,
        cert_file=pki.cert,
        key_file=pki.key,
    ).start()
    yield bouncer
    bouncer.stop()


def url(port: int, pki: Pki, sslmode: str = "verify-full") -> str:
    return (
        f"postgresql://postgres@localhost:{port}/{DATABASE}"
        f"?sslmode={sslmode}&sslrootcert={pki.ca_file}"
    )


async def test_a_connection_without_tls_is_refused(tls_postgres: EmbeddedPostgres) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(
            f"postgresql://postgres@127.0.0.1:{tls_postgres.port}/{DATABASE}?sslmode=disable"
        )


async def readings_flow_through(daemon: DaemonProcess, mosquitto: EmbeddedMosquitto) -> None:
    """MQTT and HTTP readings stored, a link made, analytics and status read."""
    meter, vehicle = f"MP-{uuid.uuid4().hex[:6]}", f"VP-{uuid.uuid4().hex[:6]}"
    publisher = Publisher(mosquitto.port)
    publisher.publish_all([(f"meters/{meter}/telemetry", meter_json(meter, minutes_ago(2)))])
    publisher.close()

    async def meter_seen() -> bool:
        response = await asyncio.to_thread(daemon.get, f"/v1/status/meter/{meter}")
        return response.status_code == 200

    await eventually(meter_seen)
    base = daemon.base_url
    link = httpx.put(f"{base}/v1/links", json={"vehicleId": vehicle, "meterId": meter})
    assert link.status_code in (200, 201), link.text
    stored = httpx.post(
        f"{base}/v1/ingestion/vehicle", content=vehicle_json(vehicle, minutes_ago(1)), timeout=10
    )
    assert stored.status_code == 201, stored.text
    analytics = httpx.get(f"{base}/v1/analytics/performance/{vehicle}", timeout=10)
    assert analytics.status_code == 200 and analytics.json()["readings"]["vehicle"] == 1
    # (Each analytics read is a transaction of its own with SET LOCAL: it holds through a
    # transaction pooler, and leaves nothing on the server connection.)
    fleet = httpx.get(f"{base}/v1/analytics/fleet", params={"limit": 10_000}, timeout=10)
    assert fleet.status_code == 200, fleet.text
    assert vehicle in [v["vehicleId"] for v in fleet.json()["vehicles"]]
    series = httpx.get(f"{base}/v1/analytics/performance/{vehicle}/series", timeout=10)
    assert series.status_code == 200, series.text
    assert sum(b["readings"]["vehicle"] for b in series.json()["series"]) == 1
    assert daemon.get("/health").status_code == 200


async def test_tls_only_postgresql_with_the_ca_and_the_host_name_checked(
    tls_postgres: EmbeddedPostgres, pki: Pki, mosquitto: EmbeddedMosquitto
) -> None:
    daemon = DaemonProcess(database_url=url(tls_postgres.port, pki), mqtt_url=mosquitto.url).start()
    try:
        await readings_flow_through(daemon, mosquitto)
    finally:
        assert daemon.stop() == 0, daemon.log()


async def test_behind_pgbouncer_in_transaction_mode(
    pgbouncer: PgBouncer, pki: Pki, mosquitto: EmbeddedMosquitto
) -> None:
    """Migrations, partition upkeep, flushes, links and analytics, all through the pooler;
    two daemons at once, so that their statements interleave on shared server connections."""
    daemons = [
        DaemonProcess(
            database_url=url(pgbouncer.port, pki),
            mqtt_url=mosquitto.url,
            db_pooler="transaction",
        ).start()
        for _ in range(2)
    ]
    try:
        await readings_flow_through(daemons[0], mosquitto)
        for daemon in daemons:
            assert "prepared statement" not in daemon.log()
    finally:
        for daemon in daemons:
            assert daemon.stop() == 0, daemon.log()


async def test_without_db_pooler_the_log_says_what_to_set(
    pgbouncer: PgBouncer, pki: Pki, mosquitto: EmbeddedMosquitto
) -> None:
    daemon = DaemonProcess(database_url=url(pgbouncer.port, pki), mqtt_url=mosquitto.url)
    daemon.start(wait=False)
    try:

        async def hinted() -> bool:
            await asyncio.sleep(0.2)
            return "set DB_POOLER=transaction" in daemon.log()

        await eventually(hinted, timeout_s=20)
    finally:
        assert daemon.stop() == 0  # SIGTERM ends it while it waits for the database too
