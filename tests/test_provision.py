"""Credentials and ACL (SPEC §3): a device publishes only to its own topics; the daemon reads."""

from __future__ import annotations

import base64
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from daemon.embedded import BrokerAuth, EmbeddedMosquitto
from daemon.provision import ProvisionError, hash_password, provision
from tests.services import REPO, service_root


def test_hash_matches_mosquittos_own_format() -> None:
    # Produced by `mosquitto_passwd -b file dev1 secret` (Mosquitto 2.0).
    line = (
        "$7$101$Y9D+oft+fTzivo5R$CsrDl70KfVwEeuIHIByJcQZWrHmjuUB2gtks0UsOF4MGpSjBeD/"
        "ZxmUEJgVq3QWAVSeaI+VOuh9YkD+Rsp5Lbw=="
    )
    salt = base64.b64decode(line.split("$")[3])
    assert hash_password("secret", salt=salt) == line


def test_provision_replaces_an_existing_user(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    provision(passwd, "M-1", "one")
    provision(passwd, "V-1", "two")
    provision(passwd, "M-1", "three")
    users = [line.split(":")[0] for line in passwd.read_text().splitlines()]
    assert users == ["V-1", "M-1"]


@pytest.mark.parametrize("name", ["a:b", "meters/+", "#", ""])
def test_provision_refuses_names_that_would_break_the_file_or_acl(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(ProvisionError):
        provision(tmp_path / "passwd", name)


@pytest.fixture
def secured_broker() -> Iterator[tuple[EmbeddedMosquitto, dict[str, str]]]:
    root = service_root("auth")
    passwd, acl = root / "passwd", root / "acl"
    shutil.copy(REPO / "deploy" / "mosquitto" / "acl", acl)
    passwords = {name: provision(passwd, name) for name in ("energy-ingest", "M-1", "M-2")}
    broker = EmbeddedMosquitto(root / "mosquitto", port=0, auth=BrokerAuth(passwd, acl))
    broker.start()
    yield broker, passwords
    broker.stop()


def client(port: int, user: str, password: str) -> tuple[mqtt.Client, ReasonCode]:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    connected = threading.Event()
    result: list[ReasonCode] = []

    def on_connect(*args: object) -> None:
        result.append(args[3])  # type: ignore[arg-type,unused-ignore]
        connected.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert connected.wait(10)
    return c, result[0]


def test_devices_publish_only_to_their_own_topic_and_the_daemon_reads(
    secured_broker: tuple[EmbeddedMosquitto, dict[str, str]],
) -> None:
    broker, passwords = secured_broker
    received: list[str] = []
    got = threading.Event()
    reader, code = client(broker.port, "energy-ingest", passwords["energy-ingest"])
    assert not code.is_failure

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        received.append(message.topic)
        if message.topic == "meters/M-1/telemetry":
            got.set()

    reader.on_message = on_message
    subscribed = threading.Event()
    reader.on_subscribe = lambda *args: subscribed.set()
    reader.subscribe("$share/ingest/meters/+/telemetry", qos=1)
    assert subscribed.wait(10)

    device, code = client(broker.port, "M-1", passwords["M-1"])
    assert not code.is_failure
    # QoS 0 first: the broker drops it silently and keeps the connection; a message from
    # one client keeps its order, so had it passed it would arrive before the next one.
    device.publish("meters/M-2/telemetry", b"{}", qos=0)
    device.publish("meters/M-1/telemetry", b"{}", qos=1).wait_for_publish(10)
    assert got.wait(10)
    assert received == ["meters/M-1/telemetry"]  # M-2's topic never reached the daemon
    for c in (device, reader):
        c.disconnect()
        c.loop_stop()


def test_a_wrong_password_is_refused(
    secured_broker: tuple[EmbeddedMosquitto, dict[str, str]],
) -> None:
    broker, _ = secured_broker
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set("M-1", "not-the-password")
    codes: list[ReasonCode] = []
    done = threading.Event()

    def on_connect(*args: object) -> None:
        codes.append(args[3])  # type: ignore[arg-type,unused-ignore]
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    assert done.wait(10)
    c.loop_stop()
    assert codes[0].is_failure


def test_a_device_provisioned_later_works_after_a_reload(
    secured_broker: tuple[EmbeddedMosquitto, dict[str, str]],
) -> None:
    broker, _ = secured_broker
    assert broker.auth is not None
    password = provision(broker.auth.password_file, "V-9")
    broker.reload()
    for _ in range(50):
        c, code = client(broker.port, "V-9", password)
        c.disconnect()
        c.loop_stop()
        if not code.is_failure:
            return
        time.sleep(0.1)
    raise AssertionError("the new device was not accepted after SIGHUP")
