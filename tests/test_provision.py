"""Broker identities (SPEC §3): every device and daemon replica a user of its own; a device
publishes only to its own topic of its own stream; no client can take another's session."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from daemon.provision import (
    USERNAME,
    BrokerFiles,
    ProvisionError,
    Role,
    hash_password,
    provision,
    read_acl,
)
from daemon.services import BrokerAuth, EmbeddedMosquitto, EmbeddedPostgres
from tests.conftest import fresh_database
from tests.helpers import eventually, meter_json, minutes_ago
from tests.services import DaemonProcess, service_root


def files_in(folder: Path) -> BrokerFiles:
    return BrokerFiles(folder / "passwd", folder / "acl")


def test_hash_matches_mosquittos_own_format() -> None:
    # Produced by `mosquitto_passwd -b file dev1 secret` (Mosquitto 2.0).
    line = (
        "$7$101$Y9D+oft+fTzivo5R$CsrDl70KfVwEeuIHIByJcQZWrHmjuUB2gtks0UsOF4MGpSjBeD/"
        "ZxmUEJgVq3QWAVSeaI+VOuh9YkD+Rsp5Lbw=="
    )
    salt = base64.b64decode(line.split("$")[3])
    assert hash_password("secret", salt=salt) == line


def test_provision_replaces_an_existing_user_and_writes_its_role(tmp_path: Path) -> None:
    files = files_in(tmp_path)
    provision(files, Role.METER, "M-1", "one")
    provision(files, Role.VEHICLE, "V-1", "two")
    provision(files, Role.METER, "M-1", "three")
    users = [line.split(":")[0] for line in files.password_file.read_text().splitlines()]
    assert users == ["V-1", "M-1"]
    assert read_acl(files.acl_file) == {
        "M-1": ["topic write meters/M-1/telemetry"],
        "V-1": ["topic write vehicles/V-1/telemetry"],
    }


def test_an_id_keeps_its_role(tmp_path: Path) -> None:
    files = files_in(tmp_path)
    provision(files, Role.DAEMON, "energy-ingest-1")
    for role in (Role.METER, Role.VEHICLE):
        with pytest.raises(ProvisionError, match="provisioned as a daemon"):
            provision(files, role, "energy-ingest-1")


def test_both_files_are_readable_by_their_owner_alone(tmp_path: Path) -> None:
    files = files_in(tmp_path)
    (tmp_path / "passwd").write_text("")
    (tmp_path / "passwd").chmod(0o644)
    provision(files, Role.METER, "M-1")
    for path in (files.password_file, files.acl_file):
        assert path.stat().st_mode & 0o777 == 0o600, path


@pytest.mark.parametrize(
    "name", ["a:b", "meters/+", "#", "", "M-1\n", "M-1\r", "M 1", "x" * 65, "M-1\nuser x"]
)
def test_provision_refuses_ids_that_would_break_the_files(tmp_path: Path, name: str) -> None:
    with pytest.raises(ProvisionError):
        provision(files_in(tmp_path), Role.METER, name)
    assert not (tmp_path / "passwd").exists()


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=70), role=st.sampled_from(list(Role)))
def test_any_id_is_provisioned_whole_or_refused(name: str, role: Role) -> None:
    folder = Path(service_root("prov"))
    files = files_in(folder)
    try:
        provision(files, role, name, "secret")
    except ProvisionError:
        assert not USERNAME.fullmatch(name)
        assert not files.password_file.exists()
        return
    assert USERNAME.fullmatch(name)
    lines = files.password_file.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == [name]
    assert set(read_acl(files.acl_file)) == {name}


def test_a_password_must_be_one_line(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError):
        provision(files_in(tmp_path), Role.METER, "M-1", "a\nb")


# -- against a real Mosquitto with the shipped configuration ---------------------------------


@pytest.fixture
def secured_broker() -> Iterator[tuple[EmbeddedMosquitto, dict[str, str]]]:
    root = service_root("auth")
    files = files_in(root)
    users = {
        "energy-ingest-1": Role.DAEMON,
        "energy-ingest-2": Role.DAEMON,
        "M-1": Role.METER,
        "M-2": Role.METER,
        "V-1": Role.VEHICLE,
    }
    passwords = {name: provision(files, role, name) for name, role in users.items()}
    broker = EmbeddedMosquitto(
        root / "mosquitto", port=0, auth=BrokerAuth(files.password_file, files.acl_file)
    )
    broker.start()
    yield broker, passwords
    broker.stop()


def client(
    port: int, user: str, password: str, *, client_id: str = ""
) -> tuple[mqtt.Client, ReasonCode]:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
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


def closing(*clients: mqtt.Client) -> None:
    for c in clients:
        c.disconnect()
        c.loop_stop()


def publish_once(port: int, user: str, password: str, topic: str) -> int:
    """Connect, publish one QoS 1 message, and return the PUBACK's reason code. (A client
    whose publish is refused loses its connection to Mosquitto 2.0: one client each.)"""
    c, code = client(port, user, password)
    assert not code.is_failure
    acked: list[int] = []
    done = threading.Event()

    def on_publish(_c: object, _u: object, _mid: int, reason: ReasonCode, _p: object) -> None:
        acked.append(reason.value)
        done.set()

    c.on_publish = on_publish
    c.publish(topic, b"{}", qos=1)
    assert done.wait(10)
    closing(c)
    return acked[0]


def test_devices_publish_only_to_their_own_topic_of_their_own_stream(
    secured_broker: tuple[EmbeddedMosquitto, dict[str, str]],
) -> None:
    broker, passwords = secured_broker
    received: list[str] = []
    reader, code = client(broker.port, "energy-ingest-1", passwords["energy-ingest-1"])
    assert not code.is_failure
    reader.on_message = lambda _c, _u, message: received.append(message.topic)
    subscribed = threading.Event()
    reader.on_subscribe = lambda *args: subscribed.set()
    reader.subscribe(
        [("$share/ingest/meters/+/telemetry", 1), ("$share/ingest/vehicles/+/telemetry", 1)]
    )
    assert subscribed.wait(10)
    not_authorized = 0x87
    attempts = {
        ("M-1", "meters/M-2/telemetry"): not_authorized,  # another meter's topic
        ("M-1", "vehicles/M-1/telemetry"): not_authorized,  # the other stream's topic
        ("V-1", "meters/V-1/telemetry"): not_authorized,
        ("V-1", "vehicles/V-2/telemetry"): not_authorized,
        ("energy-ingest-2", "meters/M-1/telemetry"): not_authorized,  # a daemon only reads
        ("M-1", "meters/M-1/telemetry"): 0,
        ("V-1", "vehicles/V-1/telemetry"): 0,
    }
    for (user, topic), expected in attempts.items():
        assert publish_once(broker.port, user, passwords[user], topic) == expected, (user, topic)
    deadline = time.monotonic() + 10
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # anything that slipped through would be here by now
    assert sorted(received) == ["meters/M-1/telemetry", "vehicles/V-1/telemetry"]
    closing(reader)


def test_a_device_receives_no_other_devices_telemetry(
    secured_broker: tuple[EmbeddedMosquitto, dict[str, str]],
) -> None:
    broker, passwords = secured_broker
    spy, _ = client(broker.port, "M-1", passwords["M-1"])
    heard: list[str] = []
    spy.on_message = lambda _c, _u, message: heard.append(message.topic)
    subscribed = threading.Event()
    spy.on_subscribe = lambda *args: subscribed.set()
    # (Mosquitto may grant the subscription; its ACL then checks each message delivered.)
    spy.subscribe([("meters/+/telemetry", 1), ("vehicles/+/telemetry", 1), ("#", 1)])
    assert subscribed.wait(10)
    assert publish_once(broker.port, "M-2", passwords["M-2"], "meters/M-2/telemetry") in (0, 16)
    time.sleep(0.5)
    assert heard == []
    closing(spy)


def test_a_wrong_password_is_refused(
    secured_broker: tuple[EmbeddedMosquitto, dict[str, str]],
) -> None:
    broker, _ = secured_broker
    c, code = client(broker.port, "M-1", "not-the-password")
    closing(c)
    assert code.is_failure


def test_a_device_provisioned_later_works_after_a_reload(
    secured_broker: tuple[EmbeddedMosquitto, dict[str, str]],
) -> None:
    broker, _ = secured_broker
    assert broker.auth is not None
    files = BrokerFiles(broker.auth.password_file, broker.auth.acl_file)
    password = provision(files, Role.VEHICLE, "V-9")
    broker.reload()
    for _ in range(50):
        c, code = client(broker.port, "V-9", password)
        closing(c)
        if not code.is_failure:
            return
        time.sleep(0.1)
    raise AssertionError("the new device was not accepted after SIGHUP")


async def test_a_device_using_the_daemons_client_id_cannot_take_its_session(
    secured_broker: tuple[EmbeddedMosquitto, dict[str, str]], postgres: EmbeddedPostgres
) -> None:
    """A provisioned device connects again and again with the daemon's client id while
    other devices publish: the daemon keeps its session, and every reading the broker
    acknowledged to a device is stored."""
    broker, passwords = secured_broker
    db_url = await fresh_database(postgres)
    daemon = DaemonProcess(
        database_url=db_url,
        mqtt_url=f"mqtt://energy-ingest-1:{passwords['energy-ingest-1']}@127.0.0.1:{broker.port}",
        mqtt_client_id="energy-ingest-1",
    ).start()
    stop = threading.Event()

    def impostor() -> None:
        while not stop.is_set():
            c, _ = client(broker.port, "M-2", passwords["M-2"], client_id="energy-ingest-1")
            time.sleep(0.05)
            closing(c)

    thief = threading.Thread(target=impostor, daemon=True)
    thief.start()
    try:
        device, _ = client(broker.port, "M-1", passwords["M-1"], client_id="M-1")
        sent = [meter_json("M-1", minutes_ago(m)) for m in range(1, 41)]
        for payload in sent:
            device.publish("meters/M-1/telemetry", payload, qos=1).wait_for_publish(10)
            await asyncio.sleep(0.02)
        closing(device)
        conn = await asyncpg.connect(db_url)
        try:

            async def all_stored() -> bool:
                n = await conn.fetchval("SELECT count(*) FROM meter_readings")
                return bool(n == len(sent))

            await eventually(all_stored)
        finally:
            await conn.close()
    finally:
        stop.set()
        thief.join(10)
        log = daemon.log()
        assert daemon.stop() == 0, log
    assert "session taken over" not in log and "connection lost" not in log, log
