"""A fast, plain-socket MQTT 5 publisher for the simulator and the benchmarks.

Packets are encoded by the `mqtt5` codec ahead of time and written in large chunks; QoS 1
acknowledgements are read back as they come, with at most `window` messages in flight. A
Python client that handles one message at a time tops out near 5,500 QoS 1 messages/s, too
slow to measure the daemon.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Sequence

import mqtt5

CHUNK = 500


class RawPublisher:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        window: int = 20_000,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.window = min(window, 60_000)
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()
        self.connack: mqtt5.ConnAckPacket | None = None
        self._next_id = 0
        self.inflight = 0
        self.acked = 0
        self.refused = 0
        self.sock.sendall(
            mqtt5.ConnectPacket(
                client_id,
                keep_alive=60,
                clean_start=True,
                username=username,
                password=password.encode() if password is not None else None,
            ).write()
        )
        while self.connack is None:
            self._absorb(self.sock.recv(1 << 16))
        if self.connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            raise ConnectionError(f"broker refused the connection: {self.connack.reason_code!r}")

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _absorb(self, data: bytes) -> None:
        """Count the acks in `data` (and keep a CONNACK among them)."""
        if not data:
            raise ConnectionError("broker closed the connection")
        self._buffer += data
        used = 0
        with memoryview(self._buffer) as view:
            while used < len(view):
                rest = view[used:]
                try:
                    packet, size = mqtt5.read(rest)
                except IndexError:  # the rest of this packet has not arrived
                    break
                finally:
                    rest.release()
                used += size
                if isinstance(packet, mqtt5.PubAckPacket):
                    self.inflight -= 1
                    self.acked += 1
                    self.refused += packet.reason_code.value >= 0x80
                elif isinstance(packet, mqtt5.ConnAckPacket):
                    self.connack = packet
        del self._buffer[:used]

    def _read_until(self, done: Callable[[], bool]) -> None:
        while not done():
            self._absorb(self.sock.recv(1 << 16))

    def _drain_available(self) -> None:
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data = self.sock.recv(1 << 16)
                except BlockingIOError:
                    return
                self._absorb(data)
        finally:
            self.sock.setblocking(True)

    def publish_many(self, messages: Iterable[tuple[str, bytes]], *, qos: int = 1) -> int:
        """Publish every message; returns once the broker has acked them all (QoS 1)."""
        sent = 0
        chunk: list[bytes] = []
        for topic, payload in messages:
            packet_id = self._packet_id() if qos else 0
            chunk.append(_publish_packet(topic, payload, qos, packet_id))
            if len(chunk) >= CHUNK:
                sent += self._send(chunk, qos)
                chunk = []
        if chunk:
            sent += self._send(chunk, qos)
        if qos:
            self._read_until(lambda: self.inflight <= 0)
        return sent

    def _send(self, chunk: Sequence[bytes], qos: int) -> int:
        if qos:
            if self.inflight + len(chunk) > self.window:
                self._read_until(lambda: self.inflight + len(chunk) <= self.window)
            self.inflight += len(chunk)
        self.sock.sendall(b"".join(chunk))
        if qos:
            self._drain_available()
        return len(chunk)

    def paced(
        self,
        messages: Sequence[tuple[str, bytes]],
        *,
        rate_per_s: float,
        qos: int = 1,
        tick_s: float = 0.01,
    ) -> int:
        """Publish at `rate_per_s` messages a second, in ticks of `tick_s`."""
        started = time.perf_counter()
        sent = 0
        while sent < len(messages):
            due = min(len(messages), int((time.perf_counter() - started) * rate_per_s) + 1)
            if due > sent:
                self.publish_chunk(messages[sent:due], qos=qos)
                sent = due
            else:
                time.sleep(tick_s)
        if qos:
            self._read_until(lambda: self.inflight <= 0)
        return sent

    def publish_chunk(self, messages: Sequence[tuple[str, bytes]], *, qos: int = 1) -> None:
        chunk = [
            _publish_packet(topic, payload, qos, self._packet_id() if qos else 0)
            for topic, payload in messages
        ]
        for start in range(0, len(chunk), CHUNK):
            self._send(chunk[start : start + CHUNK], qos)

    def close(self) -> None:
        try:
            self.sock.sendall(mqtt5.DisconnectPacket().write())
        finally:
            self.sock.close()


def _publish_packet(topic: str, payload: bytes, qos: int, packet_id: int) -> bytes:
    return mqtt5.PublishPacket(
        topic, payload, qos=mqtt5.QoS(qos), packet_id=packet_id if qos else None
    ).write()
