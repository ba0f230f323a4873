"""The MQTT subscriber: an asyncio protocol of our own on top of `broker.packets`.

Why not a library client: acknowledging a QoS 1 message only after the transaction holding
it has committed needs manual acknowledgement. paho-mqtt 2 has it (aiomqtt does not expose
it), and the daemon first used it; profiled under a stored backlog (`energy-ingest bench
mqtt-drain`), paho's one-packet-at-a-time reader and per-packet writes took more than half of
the daemon's CPU. Here one `data_received` decodes every packet in the chunk it got, and the
PUBACKs of a whole flush leave in one write. See BENCHMARKS.md for the numbers.

Each connection has a generation number. An ack is sent only on the connection that
delivered the message: after a reconnect the broker redelivers whatever was not acked, and
the (device, ts) identity absorbs the copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from broker import packets

log = logging.getLogger(__name__)

RECONNECT_FIRST_S = 0.2
RECONNECT_MAX_S = 10.0
CONNECT_TIMEOUT_S = 5.0
SUBSCRIBE_PACKET_ID = 1

CONNACK_REASONS = {
    0x80: "unspecified error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
}


@dataclass(frozen=True, slots=True)
class Delivery:
    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int


class _Connection(asyncio.Protocol):
    """One TCP connection to the broker: decodes what arrives, batches what leaves."""

    def __init__(self, owner: MqttSubscriber, generation: int) -> None:
        self.owner = owner
        self.generation = generation
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.backlog: deque[packets.Packet] = deque()
        self.outgoing: list[bytes] = []
        self.connack: asyncio.Future[packets.Control] = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.last_heard = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not subclasses of asyncio.Transport, but behave as one.)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        self.buffer += data
        try:
            self.backlog.extend(packets.read_packets(self.buffer))
        except (packets.ProtocolError, ValueError, IndexError) as error:
            log.error("MQTT: unreadable packet from the broker (%s); reconnecting", error)
            self.close()
            return
        self.handle_backlog()

    def handle_backlog(self) -> None:
        """Hand over decoded packets until the owner pauses (its buffer is full); the rest
        wait here, with the socket paused, until it resumes."""
        deliver = self.owner.on_delivery
        backlog = self.backlog
        while backlog and not self.owner.paused:
            packet = backlog.popleft()
            if isinstance(packet, packets.Publish):
                deliver(
                    Delivery(
                        packet.topic, packet.payload, packet.qos, packet.packet_id, self.generation
                    )
                )
            elif packet.kind == packets.CONNACK and not self.connack.done():
                self.connack.set_result(packet)
            elif packet.kind == packets.SUBACK:
                self.owner.subscribed(packet)
            elif packet.kind == packets.DISCONNECT:
                log.warning("MQTT: the broker disconnected us (reason 0x%02x)", packet.reason)
                self.close()

    def send(self, data: bytes) -> None:
        """Queue bytes; everything queued in one loop iteration leaves in one write."""
        if not self.outgoing:
            asyncio.get_running_loop().call_soon(self.flush)
        self.outgoing.append(data)

    def flush(self) -> None:
        if self.outgoing and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


class MqttSubscriber:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        client_id: str,
        topics: list[str],
        qos: int,
        session_expiry_s: int,
        keepalive_s: int,
        receive_maximum: int,
        on_delivery: Callable[[Delivery], None],
        on_connection_lost: Callable[[int], None] = lambda generation: None,
    ) -> None:
        self._host, self._port = host, port
        self._username, self._password = username, password
        self._client_id = client_id
        self._topics, self._qos = topics, qos
        self._session_expiry_s = session_expiry_s
        self._keepalive_s = keepalive_s
        self._receive_maximum = receive_maximum
        self.on_delivery = on_delivery
        self._on_connection_lost = on_connection_lost
        self.generation = 0
        self.connected = False
        self.last_error = "not connected yet"
        self.paused = False
        self._connection: _Connection | None = None

    # -- public -------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, and reconnect with back-off, until cancelled."""
        backoff = RECONNECT_FIRST_S
        try:
            while True:
                try:
                    connection = await self._connect()
                except (OSError, TimeoutError, ConnectionError) as error:
                    self.last_error = f"cannot connect to {self._host}:{self._port}: {error}"
                    log.warning("MQTT %s; retrying in %.1f s", self.last_error, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RECONNECT_MAX_S)
                    continue
                backoff = RECONNECT_FIRST_S
                await self._serve(connection)
        finally:
            self.connected = False

    def ack(self, delivery: Delivery) -> None:
        """PUBACK a QoS 1 message, if the connection that delivered it is still up."""
        connection = self._connection
        if (
            delivery.qos > 0
            and connection is not None
            and (delivery.generation == connection.generation and self.connected)
        ):
            connection.send(packets.puback(delivery.mid))

    def subscribed(self, suback: packets.Control) -> None:
        for topic, code in zip(self._topics, suback.granted, strict=False):
            if code >= 0x80:
                log.error("MQTT subscription to %s refused (reason 0x%02x)", topic, code)

    def pause(self) -> None:
        """Stop reading from the broker (backpressure: the buffer is full)."""
        self.paused = True
        if self._connection is not None and self._connection.transport is not None:
            self._connection.transport.pause_reading()

    def resume(self) -> None:
        if not self.paused:
            return
        self.paused = False
        connection = self._connection
        if connection is not None and connection.transport is not None:
            connection.handle_backlog()
            if not self.paused:
                connection.transport.resume_reading()

    # -- connection ---------------------------------------------------------------------

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        self.generation += 1
        generation = self.generation
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, connection = await loop.create_connection(
                lambda: _Connection(self, generation), self._host, self._port
            )
        connection.send(
            packets.connect(
                client_id=self._client_id,
                keepalive_s=self._keepalive_s,
                clean_start=False,
                session_expiry_s=self._session_expiry_s,
                # The broker never has more unacked QoS 1 messages out to us than this: the
                # bound on what a slow database can make us hold in memory.
                receive_maximum=self._receive_maximum,
                username=self._username,
                password=self._password,
            )
        )
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                connack = await connection.connack
        except TimeoutError:
            connection.close()
            raise
        if connack.reason >= 0x80:
            connection.close()
            reason = CONNACK_REASONS.get(connack.reason, f"reason 0x{connack.reason:02x}")
            raise ConnectionError(f"the broker refused the connection: {reason}")
        # Not waiting for the SUBACK: a stored session's messages may come first and fill
        # the buffer; the SUBACK is read, and checked, when its turn comes.
        connection.send(packets.subscribe(SUBSCRIBE_PACKET_ID, self._topics, self._qos))
        self._connection = connection
        self.connected = True
        self.last_error = ""
        if self.paused and connection.transport is not None:
            connection.transport.pause_reading()
        log.info(
            "MQTT connected to %s:%d as %r (session present: %s), subscribed to %s",
            self._host,
            self._port,
            self._client_id,
            connack.session_present,
            self._topics,
        )
        return connection

    async def _serve(self, connection: _Connection) -> None:
        """Keep the connection alive until it closes."""
        interval = max(1.0, self._keepalive_s / 2)
        try:
            while not connection.closed.done():
                await asyncio.wait({connection.closed}, timeout=interval)
                if connection.closed.done():
                    break
                connection.send(packets.PINGREQ_PACKET)
                # While reading is paused nothing is heard, not even PINGRESP: only judge
                # silence while reading.
                silent = time.monotonic() - connection.last_heard
                if not self.paused and silent > self._keepalive_s * 1.5:
                    log.warning("MQTT: nothing from the broker for %.0f s; reconnecting", silent)
                    connection.close()
                    await connection.closed
        except asyncio.CancelledError:
            # Stopping: send what is queued (the last PUBACKs), then a clean DISCONNECT,
            # which keeps the session (clean start off, expiry set).
            self.connected = False
            connection.send(packets.DISCONNECT_PACKET)
            connection.flush()
            connection.close()
            log.info("MQTT disconnected from %s:%d", self._host, self._port)
            raise
        self.connected = False
        self._connection = None
        error = connection.closed.result()
        self.last_error = f"connection lost: {error or 'closed by the broker'}"
        log.warning("MQTT %s", self.last_error)
        self._on_connection_lost(connection.generation)
