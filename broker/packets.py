"""The MQTT 5 packets the daemon and the simulator use, encoded and decoded by hand.

Only what an ingestion client needs: CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH and PUBACK
(QoS 0 and 1), PINGREQ/PINGRESP, DISCONNECT. Decoding works on a buffer holding many packets
at once, so one `recv` can carry hundreds of messages; see broker/subscriber.py for why.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

PROP_SESSION_EXPIRY = 0x11
PROP_RECEIVE_MAXIMUM = 0x21
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class ProtocolError(Exception):
    """The peer sent something this client cannot read; the connection must be closed."""


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return _U16.pack(len(raw)) + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + varint(len(body)) + body


def connect(
    *,
    client_id: str,
    keepalive_s: int,
    clean_start: bool,
    session_expiry_s: int,
    receive_maximum: int,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    flags = (0x02 if clean_start else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if password is not None else 0
    props = bytes((PROP_SESSION_EXPIRY,)) + _U32.pack(session_expiry_s)
    props += bytes((PROP_RECEIVE_MAXIMUM,)) + _U16.pack(receive_maximum)
    body = _string("MQTT") + bytes((5, flags)) + _U16.pack(keepalive_s)
    body += varint(len(props)) + props + _string(client_id)
    if username is not None:
        body += _string(username)
    if password is not None:
        body += _string(password)
    return _packet(CONNECT << 4, body)


def subscribe(packet_id: int, topics: list[str], qos: int) -> bytes:
    body = _U16.pack(packet_id) + b"\x00"
    for topic in topics:
        body += _string(topic) + bytes((qos,))
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def publish(topic: str, payload: bytes, *, qos: int, packet_id: int = 0) -> bytes:
    body = _string(topic)
    if qos:
        body += _U16.pack(packet_id)
    return _packet((PUBLISH << 4) | (qos << 1), body + b"\x00" + payload)


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + _U16.pack(packet_id)


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    packet_id: int
    dup: bool


@dataclass(frozen=True, slots=True)
class Control:
    """Any other packet: its type, and what the client acts on."""

    kind: int
    packet_id: int = 0
    reason: int = 0
    session_present: bool = False
    granted: tuple[int, ...] = ()


Packet = Publish | Control


def _read_varint(buffer: bytes | bytearray | memoryview, at: int) -> tuple[int, int] | None:
    """(value, position after it), or None if the buffer ends inside it."""
    value, shift = 0, 0
    for offset in range(4):
        if at + offset >= len(buffer):
            return None
        byte = buffer[at + offset]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at + offset + 1
        shift += 7
    raise ProtocolError("malformed remaining length")


def read_packets(buffer: bytearray) -> list[Packet]:
    """Every whole packet at the start of `buffer`, removed from it (a partial one stays)."""
    packets: list[Packet] = []
    at = 0
    with memoryview(buffer) as view:
        while len(buffer) - at >= 2:
            length = _read_varint(buffer, at + 1)
            if length is None:
                break
            size, start = length
            end = start + size
            if end > len(buffer):
                break
            packets.append(_decode(buffer[at], view, start, end))
            at = end
    del buffer[:at]
    return packets


def _decode(header: int, view: memoryview, start: int, end: int) -> Packet:
    kind = header >> 4
    if kind == PUBLISH:
        qos = (header >> 1) & 0x03
        topic_len = _U16.unpack_from(view, start)[0]
        at = start + 2 + topic_len
        topic = bytes(view[start + 2 : at]).decode()
        packet_id = 0
        if qos:
            packet_id = _U16.unpack_from(view, at)[0]
            at += 2
        if view[at] == 0:  # no properties: the common case
            at += 1
        else:
            props = _read_varint(view, at)
            if props is None:
                raise ProtocolError("truncated PUBLISH properties")
            at = props[1] + props[0]
        return Publish(topic, bytes(view[at:end]), qos, packet_id, bool(header & 0x08))
    if kind == CONNACK:
        return Control(CONNACK, reason=view[start + 1], session_present=bool(view[start] & 1))
    if kind == SUBACK:
        packet_id = _U16.unpack_from(view, start)[0]
        props = _read_varint(view, start + 2)
        if props is None:
            raise ProtocolError("truncated SUBACK")
        codes_at = props[1] + props[0]
        return Control(SUBACK, packet_id=packet_id, granted=tuple(view[codes_at:end]))
    if kind == PUBACK:
        reason = view[start + 2] if end - start > 2 else 0
        return Control(PUBACK, packet_id=_U16.unpack_from(view, start)[0], reason=reason)
    if kind == DISCONNECT:
        return Control(DISCONNECT, reason=view[start] if end > start else 0)
    if kind in (PINGRESP, PINGREQ):
        return Control(kind)
    raise ProtocolError(f"unexpected packet type {kind}")
