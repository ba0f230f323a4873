"""The HTTP protocol's joined writes: one write per answer, nothing lost on close."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import orjson

from api.protocol import _CoalescingTransport
from tests.helpers import meter_json, minutes_ago
from tests.services import DaemonProcess


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> Any:
        return f"info:{name}"


async def test_writes_of_one_loop_turn_leave_as_one() -> None:
    real = FakeTransport()
    transport = _CoalescingTransport(cast(asyncio.Transport, real))
    transport.write(b"HTTP/1.1 201 Created\r\n\r\n")
    transport.write(b'{"status":"accepted"}')
    assert real.writes == []  # not yet: the turn is not over
    await asyncio.sleep(0)
    assert real.writes == [b'HTTP/1.1 201 Created\r\n\r\n{"status":"accepted"}']
    assert transport.get_extra_info("peername") == "info:peername"  # the rest passes through


async def test_close_sends_what_was_written_first() -> None:
    real = FakeTransport()
    transport = _CoalescingTransport(cast(asyncio.Transport, real))
    transport.write(b"answer")
    transport.close()
    assert real.writes == [b"answer"] and real.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
    assert real.writes == [b"answer"]


def test_pipelined_requests_and_a_closing_one_all_get_their_answers(
    daemon: DaemonProcess,
) -> None:
    def request(minutes: int, close: bool = False) -> bytes:
        body = meter_json("M-pipe", minutes_ago(minutes))
        headers = f"POST /v1/ingestion/meter HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        return (headers + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body

    with socket.create_connection(("127.0.0.1", daemon.http_port), timeout=15) as conn:
        conn.sendall(request(3) + request(2) + request(1, close=True))
        received = b""
        while chunk := conn.recv(65536):  # until the daemon closes the connection
            received += chunk
    answers = received.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 3, received
    for answer in answers:
        assert answer.startswith(b"201 "), answer
        body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["status"] == "accepted" and body["deviceId"] == "M-pipe"
