"""Size limits that agree end to end (mosquitto.conf, "Size limits"): whatever the shipped
broker accepts from a device, the daemon receives and stores or records; whatever is larger,
the broker refuses to the publisher, whatever its protocol. Real Mosquitto (the shipped
configuration), real daemon; raw MQTT 5 and MQTT 3.1.1 publishers, so that packets can carry
any user properties and no client library refuses them first."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import asyncpg
import mqtt5
import orjson
import pytest

from daemon.services import EmbeddedMosquitto
from tests.helpers import eventually, iso, minutes_ago
from tests.services import DaemonProcess

PAYLOAD_LIMIT = 4 * 1024 * 1024  # what the packet's room is meant for
PACKET_LIMIT = PAYLOAD_LIMIT + 16 * 1024  # max_packet_size: the one limit


@pytest.fixture(scope="module")
def receiving(module_db: str, mosquitto: EmbeddedMosquitto) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(database_url=module_db, mqtt_url=mosquitto.url).start()
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def publish_once(
    port: int, topic: str, payload: bytes, properties: list[tuple[str, str]]
) -> tuple[str, int]:
    """One QoS 1 PUBLISH: ("puback", reason) or ("disconnect", reason) or ("closed", 0)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(mqtt5.ConnectPacket(f"limits-{uuid.uuid4().hex[:8]}").write())
        packet = mqtt5.PublishPacket(
            topic,
            payload,
            qos=mqtt5.QoS.AT_LEAST_ONCE,
            packet_id=1,
            user_properties=properties,
        ).write()
        buffer = bytearray()
        connack_seen = False
        sent = False
        while True:
            if connack_seen and not sent:
                sent = True
                try:
                    sock.sendall(packet)
                except OSError:
                    return "closed", 0
            try:
                data = sock.recv(65536)
            except OSError:
                return "closed", 0
            if not data:
                return "closed", 0
            buffer += data
            while buffer:
                try:
                    answer, size = mqtt5.read(memoryview(bytes(buffer)))
                except IndexError:
                    break
                except ValueError:  # a reason code the codec does not know for the packet
                    if buffer[0] >> 4 == 4 and len(buffer) >= 5:  # (Mosquitto: 0x95 in a PUBACK)
                        return "puback", buffer[4]
                    raise
                del buffer[:size]
                if isinstance(answer, mqtt5.ConnAckPacket):
                    connack_seen = True
                elif isinstance(answer, mqtt5.PubAckPacket):
                    return "puback", answer.reason_code.value
                elif isinstance(answer, mqtt5.DisconnectPacket):
                    return "disconnect", answer.reason_code.value


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def publish_once_v311(port: int, topic: str, payload: bytes) -> tuple[str, int]:
    """One QoS 1 PUBLISH from an MQTT 3.1.1 client: ("puback", 0) or ("closed", 0)."""
    client = f"limits3-{uuid.uuid4().hex[:8]}"
    connect = b"\x00\x04MQTT\x04\x02\x00\x3c" + _string(client)  # clean session, 60 s
    body = _string(topic) + b"\x00\x01" + payload  # packet id 1
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"\x10" + _remaining_length(len(connect)) + connect)
        if sock.recv(4)[:1] != b"\x20":
            return "closed", 0
        try:
            sock.sendall(b"\x32" + _remaining_length(len(body)) + body)
            answer = sock.recv(4)
        except OSError:
            return "closed", 0
        return ("puback", 0) if answer[:1] == b"\x40" else ("closed", 0)


def reading(meter: str, *, size: int = 0) -> bytes:
    body = orjson.dumps(
        {"meterId": meter, "kwhConsumedAc": 0.5, "voltage": 230.0, "timestamp": iso(minutes_ago(1))}
    )
    return body + b" " * max(0, size - len(body))  # (JSON allows the padding)


def properties_of(size: int) -> list[tuple[str, str]]:
    """User properties of about `size` bytes on the wire."""
    return [(f"k{n}", "v" * 1000) for n in range(size // 1006)]


async def stored(url: str, meter: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM meter_readings WHERE meter_id = $1", meter)
        )
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("payload_bytes", "property_bytes"),
    [
        (0, 12_000),  # user properties within the packet's room
        (PAYLOAD_LIMIT, 0),  # a payload of exactly the limit
        (PAYLOAD_LIMIT - 20_000, 12_000),  # both near their limits
    ],
)
async def test_what_the_broker_accepts_the_daemon_stores(
    receiving: DaemonProcess,
    mosquitto: EmbeddedMosquitto,
    module_db: str,
    payload_bytes: int,
    property_bytes: int,
) -> None:
    meter = f"LIM-{uuid.uuid4().hex[:8]}"
    answer = publish_once(
        mosquitto.port,
        f"meters/{meter}/telemetry",
        reading(meter, size=payload_bytes),
        properties_of(property_bytes),
    )
    assert answer == ("puback", 0), answer

    async def there() -> bool:
        return await stored(module_db, meter) == 1

    await eventually(there, timeout_s=30)


@pytest.mark.parametrize(
    ("payload_bytes", "property_bytes"),
    [
        (PACKET_LIMIT, 0),  # max_packet_size: the payload alone past it
        (PAYLOAD_LIMIT - 10_000, 30_000),  # user properties count in it
        (PAYLOAD_LIMIT - 1000, 100_000),
    ],
)
async def test_what_is_larger_is_refused_to_the_publisher(
    receiving: DaemonProcess,
    mosquitto: EmbeddedMosquitto,
    module_db: str,
    payload_bytes: int,
    property_bytes: int,
) -> None:
    """Refused where the device hears it: never acknowledged by the broker and then lost on
    the way to the daemon (as user properties once were, the broker counting only the
    payload)."""
    meter = f"BIG-{uuid.uuid4().hex[:8]}"
    answer = publish_once(
        mosquitto.port,
        f"meters/{meter}/telemetry",
        reading(meter, size=payload_bytes),
        properties_of(property_bytes),
    )
    kind, reason = answer
    # A PUBACK with a refusal (Mosquitto 2.0 says 0x95, "packet too large", for either
    # limit), or the publisher disconnected: never a PUBACK of success.
    assert (kind == "puback" and reason >= 0x80) or kind in ("disconnect", "closed"), answer
    assert await stored(module_db, meter) == 0


@pytest.mark.parametrize(
    ("payload_bytes", "heard"),
    [
        (PAYLOAD_LIMIT + 1, ("puback", 0)),  # within the packet's room: stored
        (PACKET_LIMIT, ("closed", 0)),  # past it: disconnected, never acknowledged
    ],
)
async def test_an_mqtt_3_publisher_is_never_acknowledged_for_what_is_dropped(
    receiving: DaemonProcess,
    mosquitto: EmbeddedMosquitto,
    module_db: str,
    payload_bytes: int,
    heard: tuple[str, int],
) -> None:
    """MQTT 3.1.1 has no reason codes: over Mosquitto's `message_size_limit` a publisher got
    a PUBACK of success for a message the broker dropped. The shipped broker has one limit,
    the packet's, and disconnects a client past it: acknowledged means stored."""
    meter = f"V3-{uuid.uuid4().hex[:8]}"
    topic = f"meters/{meter}/telemetry"
    answer = publish_once_v311(mosquitto.port, topic, reading(meter, size=payload_bytes))
    assert answer == heard, answer
    expected = 1 if heard[0] == "puback" else 0

    async def settled() -> bool:
        return await stored(module_db, meter) == expected

    await eventually(settled, timeout_s=30)
