"""A request's head is bounded (SPEC §4): request line, header count and header bytes are
refused early (414, 431; 400 for what the parser refuses), at a small cost that grows with
the limits, not with what the client sends: a header line that never ends once held the
event loop for seconds, its cost growing faster than its size. Real daemon, raw sockets."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.services import EmbeddedMosquitto
from tests.helpers import meter_json, minutes_ago
from tests.services import DaemonProcess

LINE, HEADER_BYTES, HEADERS = 1024, 4096, 20


@pytest.fixture(scope="module")
def bounded(module_db: str, mosquitto: EmbeddedMosquitto) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(
        database_url=module_db,
        mqtt_url=mosquitto.url,
        http_max_request_line_bytes=LINE,
        http_max_header_bytes=HEADER_BYTES,
        http_max_headers=HEADERS,
    ).start()
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def exchange(port: int, pieces: Iterator[bytes], *, timeout_s: float = 10) -> tuple[bytes, int]:
    """Send the pieces (until the daemon stops reading), then read the answer; also how
    many bytes went out."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            for piece in pieces:
                sock.sendall(piece)
                sent += len(piece)
        except OSError:
            pass  # closed after its answer: what was refused was not read
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    return answer, sent


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    return int(answer[9:12])


def detail_of(answer: bytes) -> str:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    detail: str = orjson.loads(body)["detail"]
    return detail


def rss_mb(daemon: DaemonProcess) -> float:
    assert daemon.process is not None
    for line in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def endless_header(megabytes: int) -> Iterator[bytes]:
    yield b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bomb: "
    for _ in range(megabytes * 16):
        yield b"a" * 65536  # 64 KiB writes, never a line end


def test_header_lines_that_never_end_are_431_at_once_and_cost_little(
    bounded: DaemonProcess, record: Callable[..., None]
) -> None:
    before = rss_mb(bounded)
    answers: list[tuple[bytes, int]] = []
    bombs = [
        threading.Thread(
            target=lambda: answers.append(exchange(bounded.http_port, endless_header(64)))
        )
        for _ in range(3)
    ]
    started = time.monotonic()
    for bomb in bombs:
        bomb.start()
    slowest = 0.0
    while any(b.is_alive() for b in bombs):
        asked = time.monotonic()
        assert bounded.get("/health").status_code == 200
        slowest = max(slowest, time.monotonic() - asked)
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    assert len(answers) == 3
    for answer, _ in answers:
        assert status_of(answer) == 431
        assert "HTTP_MAX_HEADER_BYTES" in detail_of(answer)
    grown = rss_mb(bounded) - before
    assert slowest < 1.0, slowest  # the loop was never held
    assert elapsed < 10, elapsed
    assert grown < 40
    record(
        bombs=3,
        each_mib=64,
        answered=[status_of(a) for a, _ in answers],
        all_answered_in_s=round(elapsed, 2),
        slowest_health_s=round(slowest, 3),
        rss_growth_mb=round(grown, 1),
    )


def test_a_request_line_too_long_is_414(bounded: DaemonProcess) -> None:
    def pieces() -> Iterator[bytes]:
        yield b"GET /v1/rejections?x="
        for _ in range(1000):
            yield b"a" * 65536

    answer, _ = exchange(bounded.http_port, pieces())
    assert status_of(answer) == 414
    assert "HTTP_MAX_REQUEST_LINE_BYTES" in detail_of(answer)


def test_too_many_headers_is_431(bounded: DaemonProcess) -> None:
    head = b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(500))
    answer, _ = exchange(bounded.http_port, iter([head + b"\r\n"]))
    assert status_of(answer) == 431
    assert "HTTP_MAX_HEADERS" in detail_of(answer)


@pytest.mark.parametrize("head", [b"\x00\x01 nonsense\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"])
def test_a_head_the_parser_refuses_is_400_in_json(bounded: DaemonProcess, head: bytes) -> None:
    answer, _ = exchange(bounded.http_port, iter([head]))
    assert status_of(answer) == 400
    assert detail_of(answer)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    url_bytes=st.integers(min_value=0, max_value=3 * LINE),
    values=st.lists(st.integers(min_value=0, max_value=HEADER_BYTES // 4), max_size=3 * HEADERS),
    piece_bytes=st.sampled_from([61, 1000, 65536]),
)
def test_any_head_gets_the_answer_its_size_calls_for(
    bounded: DaemonProcess, url_bytes: int, values: list[int], piece_bytes: int
) -> None:
    """Whatever the sizes, and however the head is cut into writes: within the limits the
    application answers; a URL past HTTP_MAX_REQUEST_LINE_BYTES is 414; more headers than
    HTTP_MAX_HEADERS, or more bytes of them than HTTP_MAX_HEADER_BYTES, is 431."""
    url = b"/health?" + b"q" * max(0, url_bytes - 8)
    headers = [(b"X-%d" % n, b"v" * size) for n, size in enumerate(values)]
    head = b"GET " + url + b" HTTP/1.1\r\nConnection: close\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"
    header_bytes = sum(len(n) + len(v) + 4 for n, v in headers) + len(b"Connection: close\r\n")
    pieces = (head[i : i + piece_bytes] for i in range(0, len(head), piece_bytes))
    answer, _ = exchange(bounded.http_port, pieces)
    if len(url) > LINE:
        assert status_of(answer) == 414
    elif len(headers) + 1 > HEADERS or header_bytes > HEADER_BYTES:
        assert status_of(answer) == 431
    else:
        assert status_of(answer) in (200, 503), answer[:200]  # /health: the application's


def _answers(data: bytes) -> list[int]:
    """The status of each answer in a stream of HTTP/1.1 answers with content-length."""
    statuses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        statuses.append(int(head[9:12]))
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        data = rest[length:]
    return statuses


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    count=st.integers(1, 4),
    tail=st.sampled_from(
        [b"GARBAGE\r\n\r\n", b"\x00\x01 nonsense\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"]
    ),
    short_by=st.sampled_from([0, 5]),
)
def test_pipelined_requests_before_a_malformed_one_are_answered_first(
    bounded: DaemonProcess, count: int, tail: bytes, short_by: int
) -> None:
    """Requests pipelined before a head the parser refuses get their answers, in order, then
    the `400`, then the connection closes: the refusal once went out first and the earlier
    answers never (written after the end of the stream: a traceback each). With a body
    shorter than its content-length says, the rest is parsed as the next head."""
    meters = [f"PL-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    requests = b""
    for meter in meters:
        body = meter_json(meter, minutes_ago(1))
        requests += (
            b"POST /v1/ingestion/meter HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body) - short_by, body)
        )
    answer, _ = exchange(bounded.http_port, iter([requests + tail]))
    statuses = _answers(answer)
    assert statuses[-1] == 400 and len(statuses) >= 2, statuses
    if short_by == 0:
        assert statuses == [201] * count + [400], statuses
    else:  # the first body cut short (its JSON malformed), its rest the malformed next head
        assert statuses == [400, 400], statuses
    assert b"Cannot call write" not in bounded.log().encode()


@pytest.mark.parametrize("size", [b"ZZ", b"-1", b"1 2"])
def test_a_chunk_size_the_parser_refuses_is_400_at_once(
    bounded: DaemonProcess, size: bytes
) -> None:
    """A malformed chunk size is the request's own body: it never completes, so nothing was
    answered until the body timeout gave a 408, 60 s later."""
    request = (
        b"POST /v1/ingestion/meter HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        b"content-type: application/json\r\n\r\n" + size + b"\r\nxx\r\n0\r\n\r\n"
    )
    started = time.monotonic()
    answer, _ = exchange(bounded.http_port, iter([request]), timeout_s=20)
    assert _answers(answer) == [400], answer
    assert time.monotonic() - started < 5
    assert "Traceback" not in bounded.log()
