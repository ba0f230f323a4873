"""One connection to the broker: bytes in and out, packets through the `mqtt5` codec.

Why an asyncio protocol of our own around the codec rather than a client library: the daemon
acknowledges a message only after the transaction holding it has committed, so it needs
manual acknowledgement, and it drains stored backlogs of tens of thousands of messages. Here
one `data_received` decodes every packet of the chunk it got, and the acknowledgements of a
whole flush leave in one write (README, "How delivery works"; BENCHMARKS.md).

Control packets (CONNACK, SUBACK, PINGRESP, DISCONNECT) are read and acted on also while the
daemon's buffer is full: PUBLISH packets then wait here, in arrival order, and only past
`BACKLOG_MAX_MESSAGES` or `BACKLOG_MAX_BYTES` of them does the connection stop reading the
socket (a CONNACK, first on a connection, is always read).

At most DELIVER_PER_TURN messages, and no more than DELIVER_BUDGET_S of handing over, in one
turn of the event loop; the rest wait here, in order, for the next turn: a chunk of a stored
backlog (a thousand messages in one read), or a burst of messages costly to validate (a
hundred arrays of 10,000 invalid objects once held the loop for 6 s), never holds the loop
that HTTP and the flushes' acknowledgements share for longer than the budget and one message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol, cast

import mqtt5

# Every line is about MQTT (its `transport` field with LOG_FORMAT=json).
log = logging.LoggerAdapter(logging.getLogger(__name__), {"transport": "mqtt"})

# PUBLISH packets held while the daemon's buffer is full, before the socket is paused: enough
# to reach the control packets behind a few flushes' worth of messages, little memory. (Each
# held message costs about 450 bytes besides its payload: bounded by 32 MiB of payload alone,
# a drain of 200,000 stored messages held up to 146,000 of them, 65 MB; BENCHMARKS.md.)
BACKLOG_MAX_MESSAGES = 2_000
BACKLOG_MAX_BYTES = 8 * 1024 * 1024
# A CONNACK of MQTT 3.1.1 has a remaining length of 2 (flags, return code); an MQTT 5 one
# always carries a property length too, so it is never that short.
V311_CONNACK_HEADER = b"\x20\x02"
# About 5 ms of the loop's time (BENCHMARKS.md, operators).
DELIVER_PER_TURN = 256
DELIVER_BUDGET_S = 0.010  # (half the event loop's 20 ms budget)


class BrokerTooOld(Exception):
    """The broker answered in MQTT 3.1.1: it cannot serve an MQTT 5 client."""


class Channel(Protocol):
    """Where a delivery came from, and where its acknowledgement goes back."""

    def acknowledge(self, delivery: Delivery) -> None: ...


@dataclass(frozen=True, slots=True)
class Delivery:
    topic: str
    payload: bytes
    qos: int
    packet_id: int  # 0 for QoS 0
    generation: int  # the connection that delivered it (a later one has a higher number)
    channel: Channel  # that connection: the acknowledgement goes back on it only

    def ack(self) -> None:
        """Acknowledge it (once the transaction holding it has committed)."""
        self.channel.acknowledge(self)


class Owner(Protocol):
    """What a connection reports to the session that owns it (broker.subscriber)."""

    paused: bool

    def on_delivery(self, delivery: Delivery) -> None: ...

    def on_suback(self, connection: Connection, suback: mqtt5.SubAckPacket) -> None: ...

    def on_server_disconnect(
        self, connection: Connection, packet: mqtt5.DisconnectPacket
    ) -> None: ...

    def on_protocol_error(self, connection: Connection, problem: str) -> None: ...


class Connection(asyncio.Protocol):
    def __init__(self, owner: Owner, generation: int, *, max_packet_bytes: int) -> None:
        loop = asyncio.get_running_loop()
        self.owner = owner
        self.generation = generation
        self.max_packet_bytes = max_packet_bytes
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[mqtt5.ConnAckPacket] = loop.create_future()
        self.closed: asyncio.Future[Exception | None] = loop.create_future()
        self.last_heard = time.monotonic()
        self.ping_sent_at: float | None = None
        self.reading_paused = False
        self.closing = False
        self._buffer = bytearray()
        self._backlog: deque[mqtt5.PublishPacket] = deque()
        self._backlog_bytes = 0
        self._delivered_this_turn = 0
        self._turn_ends = 0.0
        self._hand_over_scheduled = False
        self._outgoing: list[bytes] = []

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not subclasses of asyncio.Transport, but behave as one.)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        self._delivered_this_turn = 0
        self._turn_ends = time.perf_counter() + DELIVER_BUDGET_S
        self._buffer += data
        if not self.connack.done() and self._buffer.startswith(V311_CONNACK_HEADER):
            if len(self._buffer) >= 4:
                code = self._buffer[3]
                self.connack.set_exception(BrokerTooOld(f"MQTT 3.1.1 return code {code}"))
                self.close()
            return
        used = self._decode()
        if used is None:
            return
        del self._buffer[:used]
        if len(self._buffer) > self.max_packet_bytes + 8:
            self._protocol_error(
                f"a packet over {self.max_packet_bytes} bytes, the Maximum Packet Size asked for",
                mqtt5.DisconnectReasonCode.PACKET_TOO_LARGE,
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"closed before CONNACK ({exc or 'EOF'})"))
        if not self.closed.done():
            self.closed.set_result(exc)

    # -- decoding -----------------------------------------------------------------------

    def _decode(self) -> int | None:
        """Handle every whole packet in the buffer; the bytes used, or None if the
        connection is being closed (a packet the codec refused)."""
        used = 0
        with memoryview(self._buffer) as view:
            while used < len(view) and not self.closing:
                rest = view[used:]
                try:
                    packet, size = mqtt5.read(rest)
                except IndexError:  # the rest of the packet has not arrived yet
                    break
                except Exception as error:
                    self._protocol_error(
                        f"a malformed packet ({error})", mqtt5.DisconnectReasonCode.MALFORMED_PACKET
                    )
                    return None
                finally:
                    rest.release()
                used += size
                self._handle(packet)
        return used

    def _handle(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.PublishPacket):
            if self.owner.paused or self._backlog:
                self._hold(packet)
            elif (
                self._delivered_this_turn >= DELIVER_PER_TURN
                or time.perf_counter() > self._turn_ends
            ):
                self._hold(packet)
                self._hand_over_soon()
            else:
                self._delivered_this_turn += 1
                self._deliver(packet)
        elif isinstance(packet, mqtt5.PingRespPacket):
            self.ping_sent_at = None
        elif isinstance(packet, mqtt5.SubAckPacket):
            self.owner.on_suback(self, packet)
        elif isinstance(packet, mqtt5.PubRelPacket):
            # Second half of a QoS 2 delivery, after our PUBREC (which waited for the commit).
            self.send(mqtt5.PubCompPacket(packet.packet_id).write())
        elif isinstance(packet, mqtt5.DisconnectPacket):
            self.owner.on_server_disconnect(self, packet)
            self.close()
        elif isinstance(packet, mqtt5.ConnAckPacket) and not self.connack.done():
            self.connack.set_result(packet)
        else:
            self._protocol_error(
                f"an unexpected {type(packet).__name__}", mqtt5.DisconnectReasonCode.PROTOCOL_ERROR
            )

    def _deliver(self, packet: mqtt5.PublishPacket) -> None:
        delivery = Delivery(
            packet.topic,
            packet.payload,
            packet.qos.value,
            packet.packet_id or 0,
            self.generation,
            self,
        )
        try:
            self.owner.on_delivery(delivery)
        except Exception:  # the intake records its own failures; this is the last net
            log.exception("MQTT: a message on %r could not be handed over", packet.topic)

    def _hold(self, packet: mqtt5.PublishPacket) -> None:
        self._backlog.append(packet)
        self._backlog_bytes += len(packet.payload)
        full = len(self._backlog) > BACKLOG_MAX_MESSAGES or self._backlog_bytes > BACKLOG_MAX_BYTES
        if full and not self.reading_paused:
            self.reading_paused = True
            if self.transport is not None:
                self.transport.pause_reading()

    def _hand_over_soon(self) -> None:
        if not self._hand_over_scheduled:
            self._hand_over_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._hand_over_scheduled = False
        self.hand_over_backlog()

    def hand_over_backlog(self) -> None:
        """Deliver held messages (at most DELIVER_PER_TURN or DELIVER_BUDGET_S now, the rest
        in the next turns) until the owner pauses again; read more once they fit."""
        backlog = self._backlog
        handed = 0
        ends = time.perf_counter() + DELIVER_BUDGET_S
        while backlog and not self.owner.paused and not self.closing:
            if handed >= DELIVER_PER_TURN or (handed and time.perf_counter() > ends):
                self._hand_over_soon()
                break
            packet = backlog.popleft()
            self._backlog_bytes -= len(packet.payload)
            self._deliver(packet)
            handed += 1
        if (
            self.reading_paused
            and len(backlog) <= BACKLOG_MAX_MESSAGES // 2
            and self._backlog_bytes <= BACKLOG_MAX_BYTES // 2
        ):
            self.reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- writing ------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue bytes; everything queued in one turn of the event loop leaves in one write."""
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self.flush)
        self._outgoing.append(data)

    def flush(self) -> None:
        if self._outgoing and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def acknowledge(self, delivery: Delivery) -> None:
        """PUBACK (QoS 1) or PUBREC (QoS 2; the broker's PUBREL is answered with PUBCOMP).
        Nothing once this connection is closing: the broker delivers it again on the next."""
        if delivery.qos == 0 or self.closing:
            return
        if delivery.qos == 1:
            self.send(mqtt5.PubAckPacket(delivery.packet_id).write())
        else:
            self.send(mqtt5.PubRecPacket(delivery.packet_id).write())

    def ping(self) -> None:
        if self.ping_sent_at is None:
            self.ping_sent_at = time.monotonic()
        self.send(mqtt5.PingReqPacket().write())

    def disconnect(self, reason: mqtt5.DisconnectReasonCode) -> None:
        """Send what is queued, then DISCONNECT, then close."""
        self.send(mqtt5.DisconnectPacket(reason_code=reason).write())
        self.flush()
        self.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _protocol_error(self, problem: str, reason: mqtt5.DisconnectReasonCode) -> None:
        """The broker broke the protocol: MQTT says close the connection. Nothing of this
        connection not yet acked is acked now; the broker delivers it again."""
        self.owner.on_protocol_error(self, problem)
        self.disconnect(reason)
