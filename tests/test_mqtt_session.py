"""The daemon's MQTT session (SPEC §3): back-off with jitter, MQTT_URL parsing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from broker.subscriber import BACKOFF_FIRST_S, BACKOFF_MAX_S, backoff_s
from daemon.services import EmbeddedMosquitto
from ingest.config import MqttEndpoint
from tests.services import DaemonProcess, running_mosquitto


def test_backoff_grows_with_jitter_up_to_its_ceiling() -> None:
    for attempt in range(12):
        ceiling = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**attempt)
        delays = {backoff_s(attempt) for _ in range(200)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 100  # two clients retrying together drift apart


@pytest.mark.parametrize(
    ("url", "tls", "host", "port", "user", "password"),
    [
        ("mqtt://broker", False, "broker", 1883, None, None),
        ("mqtts://broker", True, "broker", 8883, None, None),
        ("mqtts://u:p%40ss@broker:9000", True, "broker", 9000, "u", "p@ss"),
        ("tcp://10.0.0.1:1884", False, "10.0.0.1", 1884, None, None),
    ],
)
def test_mqtt_url(
    url: str, tls: bool, host: str, port: int, user: str | None, password: str | None
) -> None:
    endpoint = MqttEndpoint(url)
    assert (endpoint.tls, endpoint.host, endpoint.port) == (tls, host, port)
    assert (endpoint.username, endpoint.password) == (user, password)


@pytest.fixture
def private_broker() -> Iterator[EmbeddedMosquitto]:
    with running_mosquitto() as broker:
        yield broker


def disconnects(daemon: DaemonProcess) -> float:
    prefix = "energy_ingest_mqtt_disconnects_total{"
    lines = daemon.get("/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))


def test_two_daemons_with_one_client_id_slow_down_instead_of_fighting(
    module_db: str, private_broker: EmbeddedMosquitto
) -> None:
    """A misconfiguration (the demo broker does not tie client ids to users): each takes the
    session from the other (Mosquitto 2.0 closes the older connection without a DISCONNECT),
    and each backs off further every time, instead of five times a second."""
    twins = [
        DaemonProcess(database_url=module_db, mqtt_url=private_broker.url, mqtt_client_id="twin")
        for _ in range(2)
    ]
    for twin in twins:
        twin.start(wait=False)
    try:
        time.sleep(10)
        counts = [disconnects(twin) for twin in twins]
        # With a back-off reset at each CONNACK (0.2 s), about 50; growing, under 16.
        assert 2 <= sum(counts) <= 16, counts
    finally:
        for twin in twins:
            assert twin.stop() == 0
