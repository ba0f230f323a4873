"""The MQTT 5 packet codec of broker/packets.py: pure logic, no broker."""

from __future__ import annotations

import pytest

from broker import packets


def test_many_packets_in_one_read_and_a_partial_one_left_over() -> None:
    stream = b"".join(
        packets.publish(f"meters/M{i}/telemetry", b'{"n": %d}' % i, qos=1, packet_id=i + 1)
        for i in range(100)
    )
    tail = packets.publish("vehicles/V/telemetry", b"x" * 300, qos=1, packet_id=500)
    buffer = bytearray(stream + tail[:7])
    decoded = packets.read_packets(buffer)
    assert [p.packet_id for p in decoded if isinstance(p, packets.Publish)] == list(range(1, 101))
    assert bytes(buffer) == tail[:7]
    buffer += tail[7:]
    (last,) = packets.read_packets(buffer)
    assert isinstance(last, packets.Publish)
    assert (last.topic, last.payload, last.qos) == ("vehicles/V/telemetry", b"x" * 300, 1)
    assert buffer == bytearray()


def test_large_payloads_use_multi_byte_lengths() -> None:
    payload = b"[" + b"0," * 100_000 + b"0]"
    (packet,) = packets.read_packets(bytearray(packets.publish("t", payload, qos=0)))
    assert isinstance(packet, packets.Publish) and packet.payload == payload


def test_publish_with_properties_skips_them() -> None:
    # topic "t", packet id 7, 3 bytes of properties (content type "a"), payload "hi"
    body = b"\x00\x01t" + b"\x00\x07" + b"\x04\x03\x00\x01a" + b"hi"
    (packet,) = packets.read_packets(bytearray(b"\x32" + bytes([len(body)]) + body))
    assert isinstance(packet, packets.Publish) and packet.payload == b"hi"
    assert packet.packet_id == 7


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x20\x03\x01\x00\x00", packets.Control(packets.CONNACK, session_present=True)),
        (b"\x20\x03\x00\x86\x00", packets.Control(packets.CONNACK, reason=0x86)),
        (
            b"\x90\x05\x00\x01\x00\x01\x80",
            packets.Control(packets.SUBACK, packet_id=1, granted=(1, 0x80)),
        ),
        (b"\x40\x02\x00\x09", packets.Control(packets.PUBACK, packet_id=9)),
        (b"\xd0\x00", packets.Control(packets.PINGRESP)),
        (b"\xe0\x01\x8e", packets.Control(packets.DISCONNECT, reason=0x8E)),
    ],
)
def test_control_packets(raw: bytes, expected: packets.Control) -> None:
    assert packets.read_packets(bytearray(raw)) == [expected]


def test_connect_carries_session_expiry_receive_maximum_and_credentials() -> None:
    raw = packets.connect(
        client_id="daemon-1",
        keepalive_s=30,
        clean_start=False,
        session_expiry_s=3600,
        receive_maximum=1000,
        username="u",
        password="p",
    )
    assert raw[0] == 0x10
    assert b"\x00\x04MQTT\x05" in raw
    assert b"\x11\x00\x00\x0e\x10" in raw and b"\x21\x03\xe8" in raw
    assert raw.endswith(b"\x00\x08daemon-1\x00\x01u\x00\x01p")
    flags = raw[raw.index(b"MQTT\x05") + 5]
    assert flags == 0xC0  # user name and password, clean start off


def test_varint_round_trip() -> None:
    for value in (0, 127, 128, 16_383, 16_384, 2_097_151, 268_435_455):
        encoded = packets.varint(value)
        assert packets._read_varint(encoded, 0) == (value, len(encoded))


def test_a_malformed_length_is_a_protocol_error() -> None:
    with pytest.raises(packets.ProtocolError):
        packets.read_packets(bytearray(b"\x30\xff\xff\xff\xff\x01"))
