"""A broker that does what a test tells it, byte for byte: for the daemon's behaviour when a
broker misbehaves (malformed packets, refusals, disconnects, silence). Well-formed packets
are written with the `mqtt5` codec; broken ones are written by hand in the tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import mqtt5

P = TypeVar("P")
Handler = Callable[["FakeConnection"], Awaitable[None]]


class FakeConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received: list[Any] = []
        self._buffer = bytearray()

    async def read_packet(self, timeout_s: float = 10.0) -> Any:
        """The next packet the daemon sent (PUBACKs, PINGREQs... are kept in `received`)."""
        async with asyncio.timeout(timeout_s):
            while True:
                if self._buffer:
                    try:
                        packet, size = mqtt5.read(memoryview(bytes(self._buffer)))
                    except IndexError:
                        pass
                    else:
                        del self._buffer[:size]
                        self.received.append(packet)
                        return packet
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("the daemon closed the connection")
                self._buffer += data

    async def expect(self, kind: type[P], timeout_s: float = 10.0) -> P:
        """Read packets until one of `kind` comes."""
        while True:
            packet = await self.read_packet(timeout_s)
            if isinstance(packet, kind):
                return packet

    async def seen(self, kind: type[P], timeout_s: float = 10.0) -> P:
        """Wait until the handler reading this connection has received a packet of `kind`
        (for the test, while the connection's handler does the reading)."""
        async with asyncio.timeout(timeout_s):
            while True:
                for packet in self.received:
                    if isinstance(packet, kind):
                        return packet
                await asyncio.sleep(0.02)

    async def closed_by_daemon(self, timeout_s: float = 10.0) -> None:
        """Read until the daemon closes the connection."""
        with contextlib.suppress(ConnectionError):
            while True:
                await self.read_packet(timeout_s)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def accept(
        self, *, connack: mqtt5.ConnAckPacket | None = None, grant: list[int] | None = None
    ) -> mqtt5.SubscribePacket | None:
        """CONNECT → CONNACK; then SUBSCRIBE → SUBACK granting `grant` (QoS 1 for each
        filter by default), unless the CONNACK refused."""
        await self.expect(mqtt5.ConnectPacket)
        connack = connack or mqtt5.ConnAckPacket()
        self.send(connack.write())
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            return None
        subscribe = await self.expect(mqtt5.SubscribePacket)
        codes = grant if grant is not None else [1] * len(subscribe.topic_filters)
        self.send(suback(subscribe.packet_id, codes))
        return subscribe

    def acked(self) -> set[int]:
        """Packet ids the daemon acknowledged (PUBACK or PUBREC) on this connection."""
        return {
            p.packet_id
            for p in self.received
            if isinstance(p, mqtt5.PubAckPacket | mqtt5.PubRecPacket)
        }

    def close(self) -> None:
        self.writer.close()


def suback(packet_id: int, codes: list[int]) -> bytes:
    return mqtt5.SubAckPacket(packet_id, [mqtt5.SubAckReasonCode(c) for c in codes]).write()


def publish(topic: str, payload: bytes, *, packet_id: int, qos: int = 1) -> bytes:
    return mqtt5.PublishPacket(
        topic, payload, qos=mqtt5.QoS(qos), packet_id=packet_id if qos else None
    ).write()


class FakeBroker:
    """Listens on a free port; every connection the daemon makes goes to the next handler
    of `handlers` (the last one serves every later connection)."""

    def __init__(self, *handlers: Handler) -> None:
        self.handlers = list(handlers)
        self.connections: list[FakeConnection] = []
        self.arrived = asyncio.Condition()
        self.port = 0
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = FakeConnection(reader, writer)
        index = len(self.connections)
        self.connections.append(connection)
        async with self.arrived:
            self.arrived.notify_all()
        handler = self.handlers[min(index, len(self.handlers) - 1)]
        try:
            await handler(connection)
        except (ConnectionError, TimeoutError):
            pass
        except Exception as error:  # reported by the test that owns the broker
            self.errors.append(error)

    async def connection(self, index: int, timeout_s: float = 20.0) -> FakeConnection:
        """The index-th connection the daemon made (waits for it)."""
        async with asyncio.timeout(timeout_s), self.arrived:
            await self.arrived.wait_for(lambda: len(self.connections) > index)
        return self.connections[index]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeBroker]:
        def spawn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.create_task(self._serve(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._server = await asyncio.start_server(spawn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            self._server.close()
            for connection in self.connections:
                connection.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            assert not self.errors, self.errors


async def serve_forever(connection: FakeConnection) -> None:
    """A well-behaved broker after the handshake: answers pings, keeps the connection."""
    await connection.accept()
    while True:
        packet = await connection.read_packet(timeout_s=3600)
        if isinstance(packet, mqtt5.PingReqPacket):
            connection.send(mqtt5.PingRespPacket().write())
