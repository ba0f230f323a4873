"""The broker link over TLS (SPEC §3): `mqtts://`, trust anchors from MQTT_CA_FILE, the broker's
host name checked, client certificates. A real Mosquitto with a TLS listener, certificates
made by the test (trustme)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import trustme
from pydantic import ValidationError

from daemon.services import BrokerTls, EmbeddedMosquitto
from ingest.config import Settings
from tests.helpers import eventually, meter_json, minutes_ago
from tests.services import DaemonProcess, Publisher, service_root


class Pki:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_file = self.write("ca.pem", self.ca.cert_pem.bytes())
        broker = self.ca.issue_cert("localhost")
        self.broker_cert = self.write("broker.pem", broker.cert_chain_pems[0].bytes())
        self.broker_key = self.write("broker.key", broker.private_key_pem.bytes())
        client = self.ca.issue_cert("energy-ingest-1")
        self.client_cert = self.write("client.pem", client.cert_chain_pems[0].bytes())
        self.client_key = self.write("client.key", client.private_key_pem.bytes())
        self.other_ca_file = self.write("other-ca.pem", trustme.CA().cert_pem.bytes())

    def write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki(service_root("pki"))


def tls_broker(pki: Pki, *, require_certificate: bool) -> EmbeddedMosquitto:
    tls = BrokerTls(pki.ca_file, pki.broker_cert, pki.broker_key, require_certificate)
    broker = EmbeddedMosquitto(service_root("tls") / "mosquitto", port=0, tls=tls)
    broker.start()
    return broker


@pytest.fixture(scope="module")
def broker(pki: Pki) -> Iterator[EmbeddedMosquitto]:
    broker = tls_broker(pki, require_certificate=False)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def mutual_broker(pki: Pki) -> Iterator[EmbeddedMosquitto]:
    broker = tls_broker(pki, require_certificate=True)
    yield broker
    broker.stop()


async def test_readings_arrive_over_tls_with_the_brokers_certificate_checked(
    broker: EmbeddedMosquitto, pki: Pki, db_url: str
) -> None:
    daemon = DaemonProcess(
        database_url=db_url,
        mqtt_url=f"mqtts://localhost:{broker.tls_port}",
        mqtt_ca_file=pki.ca_file,
    ).start()
    try:
        publisher = Publisher(broker.port)
        publisher.publish_all([("meters/TLS-1/telemetry", meter_json("TLS-1", minutes_ago(1)))])
        publisher.close()
        conn = await asyncpg.connect(db_url)
        try:
            await eventually(lambda: conn.fetchval("SELECT count(*) FROM meter_readings"))
        finally:
            await conn.close()
        assert "MQTT connected to mqtts://localhost" in daemon.log()
    finally:
        assert daemon.stop() == 0


async def not_ready_because(daemon: DaemonProcess, words: str) -> dict[str, object]:
    async def refused() -> dict[str, object] | None:
        try:
            response = await asyncio.to_thread(daemon.get, "/health")
        except httpx.HTTPError:  # not listening yet
            return None
        body: dict[str, object] = response.json()
        detail = str(body["broker"]["ok"] is False and body["broker"]["detail"])  # type: ignore[index]
        return body if response.status_code == 503 and words in detail else None

    return await eventually(refused, timeout_s=20)


@pytest.mark.parametrize(
    ("host", "ca", "words"),
    [
        ("localhost", "other_ca_file", "certificate verify failed"),
        # The certificate names localhost; 127.0.0.1 is not its name.
        ("127.0.0.1", "ca_file", "certificate verify failed"),
    ],
)
async def test_a_broker_that_cannot_prove_its_name_is_refused(
    broker: EmbeddedMosquitto, pki: Pki, db_url: str, host: str, ca: str, words: str
) -> None:
    daemon = DaemonProcess(
        database_url=db_url,
        mqtt_url=f"mqtts://{host}:{broker.tls_port}",
        mqtt_ca_file=getattr(pki, ca),
    ).start(wait=False)
    try:
        await not_ready_because(daemon, words)
    finally:
        assert daemon.stop() == 0, daemon.log()


async def test_a_client_certificate_is_presented_when_the_broker_wants_one(
    mutual_broker: EmbeddedMosquitto, pki: Pki, db_url: str
) -> None:
    url = f"mqtts://localhost:{mutual_broker.tls_port}"
    without = DaemonProcess(database_url=db_url, mqtt_url=url, mqtt_ca_file=pki.ca_file)
    without.start(wait=False)
    try:
        await not_ready_because(without, "cannot connect")
    finally:
        without.stop()
    with_cert = DaemonProcess(
        database_url=db_url,
        mqtt_url=url,
        mqtt_ca_file=pki.ca_file,
        mqtt_client_cert_file=pki.client_cert,
        mqtt_client_key_file=pki.client_key,
    ).start()
    assert with_cert.stop() == 0


def test_tls_files_without_mqtts_are_a_configuration_error(pki: Pki) -> None:
    with pytest.raises(ValidationError, match="need an mqtts://"):
        Settings(mqtt_url="mqtt://broker:1883", mqtt_ca_file=pki.ca_file)
    with pytest.raises(ValidationError, match="is not a file"):
        Settings(mqtt_url="mqtts://broker", mqtt_ca_file=Path("/nonexistent/ca.pem"))
    assert Settings(mqtt_url="mqtts://broker", mqtt_ca_file=pki.ca_file).mqtt_ca_file
