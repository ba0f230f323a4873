"""A fast, plain-socket MQTT 5 publisher for the simulator and the benchmarks.

Packets are prepared as bytes and written in large chunks; QoS 1 acknowledgements are read
back as they come, with at most `window` messages in flight. A Python client that handles
one message at a time tops out near 5,500 QoS 1 messages/s, too slow to measure the daemon.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Sequence

from broker import packets

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
        self._next_id = 0
        self.inflight = 0
        self.acked = 0
        self.refused = 0
        self.sock.sendall(
            packets.connect(
                client_id=client_id,
                keepalive_s=60,
                clean_start=True,
                session_expiry_s=0,
                receive_maximum=65535,
                username=username,
                password=password,
            )
        )
        connack = self._read_connack()
        if connack:
            raise ConnectionError(f"broker refused the connection: reason {connack}")

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _absorb(self, data: bytes) -> int | None:
        """Count the acks in `data`; the reason code of a CONNACK among them, if any."""
        if not data:
            raise ConnectionError("broker closed the connection")
        self._buffer += data
        connack = None
        for packet in packets.read_packets(self._buffer):
            if isinstance(packet, packets.Control):
                if packet.kind == packets.CONNACK:
                    connack = packet.reason
                elif packet.kind == packets.PUBACK:
                    self.inflight -= 1
                    self.acked += 1
                    self.refused += packet.reason >= 0x80
        return connack

    def _read_connack(self) -> int:
        while (reason := self._absorb(self.sock.recv(1 << 16))) is None:
            pass
        return reason

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
            chunk.append(packets.publish(topic, payload, qos=qos, packet_id=packet_id))
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
            packets.publish(topic, payload, qos=qos, packet_id=self._packet_id() if qos else 0)
            for topic, payload in messages
        ]
        for start in range(0, len(chunk), CHUNK):
            self._send(chunk[start : start + CHUNK], qos)

    def close(self) -> None:
        try:
            self.sock.sendall(packets.DISCONNECT_PACKET)
        finally:
            self.sock.close()
