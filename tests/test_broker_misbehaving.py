"""The daemon against a broker that misbehaves (SPEC §3): malformed and truncated packets,
refusals, disconnects, silence, QoS 2. Each case ends with the daemon still running, not
reporting ready while it is not, and nothing acknowledged that was not committed.

The broker is `tests.fake_broker` (raw bytes, in this process); the daemon and PostgreSQL are
real processes.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import mqtt5
import pytest

from tests.fake_broker import FakeBroker, FakeConnection, publish, serve_forever, suback
from tests.helpers import meter_json, minutes_ago
from tests.services import DaemonProcess

TOPIC = "meters/FB-1/telemetry"


class Readings:
    """Readings handed to the fake broker, by packet id, to check what the daemon acked."""

    def __init__(self) -> None:
        self.by_packet_id: dict[int, datetime] = {}

    def packet(self, packet_id: int, *, qos: int = 1) -> bytes:
        at = self.by_packet_id.setdefault(packet_id, minutes_ago(100 - packet_id))
        return publish(TOPIC, meter_json("FB-1", at), packet_id=packet_id, qos=qos)


async def stored_times(db_url: str) -> set[datetime]:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT ts FROM meter_readings WHERE meter_id = 'FB-1'")
        return {r["ts"] for r in rows}
    finally:
        await conn.close()


async def assert_acked_were_stored(db_url: str, broker: FakeBroker, readings: Readings) -> None:
    stored = await stored_times(db_url)
    for connection in broker.connections:
        for packet_id in connection.acked():
            assert readings.by_packet_id[packet_id] in stored, packet_id


@pytest.fixture
async def daemon_for() -> AsyncIterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(db_url: str, broker: FakeBroker, **settings: Any) -> DaemonProcess:
        daemon = DaemonProcess(
            database_url=db_url, mqtt_url=f"mqtt://127.0.0.1:{broker.port}", **settings
        ).start(wait=False)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


async def health(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(daemon.base_url + "/health", timeout=5)
        return response.status_code, response.json()


async def wait_health(
    daemon: DaemonProcess, want: Callable[[int, dict[str, Any]], bool], timeout_s: float = 20
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
        try:
            status, body = await health(daemon)
            last = (status, body)
            if want(status, body):
                return body
        except httpx.HTTPError as error:
            last = error
        await asyncio.sleep(0.05)
    raise AssertionError(f"health never matched; last {last}\n{daemon.log()}")


def ready(status: int, body: dict[str, Any]) -> bool:
    return status == 200


def broker_down_saying(*words: str) -> Callable[[int, dict[str, Any]], bool]:
    def check(status: int, body: dict[str, Any]) -> bool:
        detail = body["broker"]["detail"]
        return status == 503 and not body["broker"]["ok"] and all(w in detail for w in words)

    return check


def metric(daemon: DaemonProcess, prefix: str) -> float:
    total = 0.0
    for line in httpx.get(daemon.base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(prefix):
            total += float(line.split()[-1])
    return total


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_with_overrunning_properties(packet_id: int) -> bytes:
    topic = TOPIC.encode()
    body = struct.pack(">H", len(topic)) + topic + struct.pack(">H", packet_id)
    body += b"\x7f" + b'{"meterId": "FB-1"}'  # says 127 bytes of properties; the packet ends first
    return b"\x32" + remaining_length(len(body)) + body


BROKEN = {
    "property length overruns the packet": publish_with_overrunning_properties(50),
    "reserved packet type 0": b"\x00\x00",
    "a second CONNACK": mqtt5.ConnAckPacket().write(),
    "a SUBACK for a SUBSCRIBE never sent": suback(999, [1, 1, 1]),
    "a PUBLISH bigger than the Maximum Packet Size": b"\x32"
    + remaining_length(100_000)
    + b"\x00" * 6000,
}


@pytest.mark.parametrize("broken", list(BROKEN))
async def test_a_broken_packet_closes_that_connection_only_and_nothing_unstored_is_acked(
    db_url: str, daemon_for: Callable[..., DaemonProcess], broken: str
) -> None:
    readings = Readings()

    async def first(c: FakeConnection) -> None:
        await c.accept()
        c.send(readings.packet(1))
        await c.expect(mqtt5.PubAckPacket)
        c.send(readings.packet(2) + BROKEN[broken])
        await c.closed_by_daemon()

    async def second(c: FakeConnection) -> None:
        await c.accept()
        c.send(readings.packet(2))  # the broker delivers again what was not acked
        await serve_forever(c)

    async with FakeBroker(first, second).running() as broker:
        daemon = daemon_for(db_url, broker, mqtt_max_packet_bytes=4096)
        reconnected = await broker.connection(1)
        await wait_health(daemon, ready)
        await reconnected.seen(mqtt5.PubAckPacket)
        disconnects = [
            p for p in broker.connections[0].received if isinstance(p, mqtt5.DisconnectPacket)
        ]
        assert [d.reason_code.value for d in disconnects] in ([0x81], [0x82], [0x95])
        assert broker.connections[0].acked() == {1}
        assert metric(daemon, 'energy_ingest_mqtt_disconnects_total{reason="protocol_error') == 1
        await assert_acked_were_stored(db_url, broker, readings)
        assert len(await stored_times(db_url)) == 2


async def test_a_packet_cut_short_by_the_broker_closing_is_never_acked(
    db_url: str, daemon_for: Callable[..., DaemonProcess]
) -> None:
    readings = Readings()

    async def first(c: FakeConnection) -> None:
        await c.accept()
        whole = readings.packet(7)
        c.send(whole[: len(whole) // 2])
        await asyncio.sleep(0.3)
        c.close()

    async with FakeBroker(first, serve_forever).running() as broker:
        daemon = daemon_for(db_url, broker)
        await broker.connection(1)
        await wait_health(daemon, ready)
        assert broker.connections[0].acked() == set()
        assert await stored_times(db_url) == set()
        assert "connection lost" in daemon.log()


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (mqtt5.ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD, "bad user name or password"),
        (mqtt5.ConnAckReasonCode.NOT_AUTHORIZED, "not authorized"),
        (mqtt5.ConnAckReasonCode.SERVER_UNAVAILABLE, "server unavailable"),
    ],
)
async def test_a_refused_connection_is_reported_in_words_and_retried(
    db_url: str, daemon_for: Callable[..., DaemonProcess], code: Any, words: str
) -> None:
    async def refuse(c: FakeConnection) -> None:
        await c.accept(connack=mqtt5.ConnAckPacket(reason_code=code))

    async with FakeBroker(refuse, refuse, serve_forever).running() as broker:
        daemon = daemon_for(db_url, broker)
        await wait_health(daemon, broker_down_saying("refused the connection", words))
        await broker.connection(2)  # retried, with back-off
        await wait_health(daemon, ready)


async def test_a_broker_speaking_only_mqtt_3_1_1_ends_the_daemon_with_a_clear_error(
    db_url: str, daemon_for: Callable[..., DaemonProcess]
) -> None:
    async def old_broker(c: FakeConnection) -> None:
        await c.read_packet()
        c.send(b"\x20\x02\x00\x01")  # 3.1.1 CONNACK: unacceptable protocol version
        c.close()

    async with FakeBroker(old_broker).running() as broker:
        daemon = daemon_for(db_url, broker)
        assert daemon.process is not None
        code = await asyncio.to_thread(daemon.process.wait, 30)
        assert code != 0
        assert "speaks only MQTT 3.1.1" in daemon.log()
        assert len(broker.connections) == 1


async def test_a_refused_subscription_is_not_ready_and_is_asked_again(
    db_url: str, daemon_for: Callable[..., DaemonProcess]
) -> None:
    async def refuse_then_grant(c: FakeConnection) -> None:
        await c.accept(grant=[0x87, 1])
        again = await c.expect(mqtt5.SubscribePacket)
        c.send(suback(again.packet_id, [1, 1]))
        await serve_forever_after_handshake(c)

    async with FakeBroker(refuse_then_grant).running() as broker:
        daemon = daemon_for(db_url, broker)
        body = await wait_health(daemon, broker_down_saying("meters/+/telemetry", "not authorized"))
        assert "vehicles" not in body["broker"]["detail"]
        assert metric(daemon, "energy_ingest_mqtt_subscription_refusals_total") == 1
        await wait_health(daemon, ready)
        assert len(broker.connections) == 1  # asked again on the same connection


async def test_a_subscription_granted_at_a_lower_qos_is_not_ready(
    db_url: str, daemon_for: Callable[..., DaemonProcess]
) -> None:
    async def grant_qos0(c: FakeConnection) -> None:
        await c.accept(grant=[0, 0])
        while True:
            subscribe = await c.expect(mqtt5.SubscribePacket, timeout_s=3600)
            c.send(suback(subscribe.packet_id, [0, 0]))

    async with FakeBroker(grant_qos0).running() as broker:
        daemon = daemon_for(db_url, broker)
        await wait_health(daemon, broker_down_saying("granted at QoS 0, not 1"))
        assert metric(daemon, "energy_ingest_broker_ready") == 0
        assert metric(daemon, "energy_ingest_broker_connected") == 1


async def serve_forever_after_handshake(c: FakeConnection) -> None:
    while True:
        packet = await c.read_packet(timeout_s=3600)
        if isinstance(packet, mqtt5.PingReqPacket):
            c.send(mqtt5.PingRespPacket().write())


DISCONNECTS = [
    (mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER, "session taken over"),
    (mqtt5.DisconnectReasonCode.SERVER_SHUTTING_DOWN, "server shutting down"),
    (mqtt5.DisconnectReasonCode.NOT_AUTHORIZED, "not authorized"),
    (mqtt5.DisconnectReasonCode.KEEP_ALIVE_TIMEOUT, "keep alive timeout"),
    (mqtt5.DisconnectReasonCode.SERVER_BUSY, "server busy"),
]


async def test_a_disconnect_from_the_broker_is_reported_in_words_and_followed_by_a_reconnect(
    db_url: str, daemon_for: Callable[..., DaemonProcess]
) -> None:
    def disconnect_with(code: Any) -> Callable[[FakeConnection], Any]:
        async def handler(c: FakeConnection) -> None:
            await c.accept()
            c.send(mqtt5.DisconnectPacket(reason_code=code).write())
            await c.closed_by_daemon()

        return handler

    handlers = [disconnect_with(code) for code, _ in DISCONNECTS]
    async with FakeBroker(*handlers, serve_forever).running() as broker:
        daemon = daemon_for(db_url, broker)
        await broker.connection(len(DISCONNECTS), timeout_s=60)
        await wait_health(daemon, ready)
        log = daemon.log()
        for code, words in DISCONNECTS:
            assert f"the broker disconnected us: {words}" in log
            name = code.name.lower()
            assert metric(daemon, f'energy_ingest_mqtt_disconnects_total{{reason="{name}"}}') == 1
        assert "every daemon replica needs an MQTT identity of its own" in log


async def test_a_server_keep_alive_shorter_than_ours_is_obeyed(
    db_url: str, daemon_for: Callable[..., DaemonProcess]
) -> None:
    pings: list[float] = []

    async def short_keepalive(c: FakeConnection) -> None:
        await c.accept(connack=mqtt5.ConnAckPacket(server_keep_alive=2))
        while True:
            await c.expect(mqtt5.PingReqPacket, timeout_s=3600)
            pings.append(time.monotonic())
            c.send(mqtt5.PingRespPacket().write())

    async with FakeBroker(short_keepalive).running() as broker:
        daemon = daemon_for(db_url, broker, mqtt_keepalive_s=60)
        await wait_health(daemon, ready)
        started = time.monotonic()
        while len(pings) < 3:
            assert time.monotonic() - started < 10, pings
            await asyncio.sleep(0.1)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) <= 2.0, gaps
        assert len(broker.connections) == 1


async def test_a_silent_broker_is_left_and_reconnected(
    db_url: str, daemon_for: Callable[..., DaemonProcess]
) -> None:
    async def silent(c: FakeConnection) -> None:
        await c.accept(connack=mqtt5.ConnAckPacket(server_keep_alive=1))
        await c.closed_by_daemon(timeout_s=30)  # reads the PINGREQs, answers none

    async with FakeBroker(silent, serve_forever).running() as broker:
        daemon = daemon_for(db_url, broker)
        await broker.connection(1, timeout_s=15)
        await wait_health(daemon, ready)
        reason = 'energy_ingest_mqtt_disconnects_total{reason="keep_alive_timeout"}'
        assert metric(daemon, reason) == 1


async def test_a_qos2_delivery_is_received_after_commit_and_completed(
    db_url: str, daemon_for: Callable[..., DaemonProcess]
) -> None:
    readings = Readings()
    stored_at_pubrec: list[set[datetime]] = []

    async def qos2(c: FakeConnection) -> None:
        await c.accept()
        c.send(readings.packet(5, qos=2))
        pubrec = await c.expect(mqtt5.PubRecPacket)
        assert pubrec.packet_id == 5
        stored_at_pubrec.append(await stored_times(db_url))
        c.send(mqtt5.PubRelPacket(5).write())
        pubcomp = await c.expect(mqtt5.PubCompPacket)
        assert pubcomp.packet_id == 5
        await serve_forever_after_handshake(c)

    async with FakeBroker(qos2).running() as broker:
        daemon_for(db_url, broker)
        connection = await broker.connection(0)
        deadline = time.monotonic() + 20
        while not any(isinstance(p, mqtt5.PubCompPacket) for p in connection.received):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert not any(isinstance(p, mqtt5.PubAckPacket) for p in connection.received)
        assert stored_at_pubrec == [{readings.by_packet_id[5]}]


async def test_control_packets_are_read_while_the_buffer_is_full(
    db_url: str, daemon_for: Callable[..., DaemonProcess]
) -> None:
    """With PostgreSQL blocked and the buffer full, a DISCONNECT is still heard, and the
    reconnect's CONNACK too (it used to time out and loop)."""
    readings = Readings()
    blocker = await asyncpg.connect(db_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("LOCK TABLE meter_readings IN ACCESS EXCLUSIVE MODE")

    async def fill_then_disconnect(c: FakeConnection) -> None:
        await c.accept()
        c.send(b"".join(readings.packet(n) for n in range(1, 21)))
        await asyncio.sleep(1.0)  # the buffer (4 readings) is full: intake paused
        c.send(
            mqtt5.DisconnectPacket(
                reason_code=mqtt5.DisconnectReasonCode.SERVER_SHUTTING_DOWN
            ).write()
        )
        await c.closed_by_daemon()

    try:
        async with FakeBroker(fill_then_disconnect, serve_forever).running() as broker:
            daemon = daemon_for(db_url, broker, buffer_max_readings=4, flush_max_readings=2)
            await broker.connection(1)
            await wait_health(daemon, lambda status, body: body["broker"]["ok"])
            assert "server shutting down" in daemon.log()
            assert all(c.acked() == set() for c in broker.connections)  # nothing committed
    finally:
        await transaction.rollback()
        await blocker.close()


async def test_connected_without_a_suback_is_not_ready(
    db_url: str, daemon_for: Callable[..., DaemonProcess]
) -> None:
    async def never_grant(c: FakeConnection) -> None:
        await c.expect(mqtt5.ConnectPacket)
        c.send(mqtt5.ConnAckPacket().write())
        await serve_forever_after_handshake(c)

    async with FakeBroker(never_grant).running() as broker:
        daemon = daemon_for(db_url, broker)
        await (await broker.connection(0)).seen(mqtt5.SubscribePacket)
        for _ in range(20):
            status, body = await health(daemon)
            assert status == 503 and "waiting for the broker to grant" in body["broker"]["detail"]
            await asyncio.sleep(0.1)


async def test_a_session_the_broker_lost_is_a_warning_and_counted(
    db_url: str, daemon_for: Callable[..., DaemonProcess]
) -> None:
    async def then_restart(c: FakeConnection) -> None:
        await c.accept()  # session present: false, as for a first start
        c.send(
            mqtt5.DisconnectPacket(
                reason_code=mqtt5.DisconnectReasonCode.SERVER_SHUTTING_DOWN
            ).write()
        )
        await c.closed_by_daemon()

    async def forgot_the_session(c: FakeConnection) -> None:
        await c.accept(connack=mqtt5.ConnAckPacket(session_present=False))
        await serve_forever_after_handshake(c)

    async with FakeBroker(then_restart, forgot_the_session).running() as broker:
        daemon = daemon_for(db_url, broker)
        await broker.connection(1)
        await wait_health(daemon, ready)
        assert metric(daemon, "energy_ingest_mqtt_sessions_lost_total") == 1
        assert "may have been lost" in daemon.log()
        first_connect = broker.connections[0].received[0]
        assert isinstance(first_connect, mqtt5.ConnectPacket)
        assert not first_connect.clean_start and first_connect.session_expiry_interval > 0
        assert first_connect.max_packet_size and first_connect.receive_max == 20000
