"""HTTP under abuse (SPEC §4): oversized bodies answered, not reset; connections that send
nothing, or too slowly, closed; a bound on connections that never shuts /health out;
parameters at their type's limits answered in words; a client that hangs up mid-body is no
error. Real daemon, raw sockets where a client library would be too polite."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.services import EmbeddedMosquitto
from tests.helpers import meter_json, minutes_ago
from tests.services import DaemonProcess

MAX_BODY = 65_536


@pytest.fixture(scope="module")
def guarded(module_db: str, mosquitto: EmbeddedMosquitto) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(
        database_url=module_db,
        mqtt_url=mosquitto.url,
        max_body_bytes=MAX_BODY,
        http_header_timeout_s=2,
        http_body_timeout_s=3,
        http_max_connections=300,
    ).start()
    yield daemon
    assert daemon.stop() == 0, daemon.log()


def raw_exchange(port: int, request: bytes, *, read_s: float = 10) -> bytes:
    """Write the whole request first, as urllib and http.client do, then read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_s) as sock:
        sock.sendall(request)
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                raise AssertionError(f"connection reset; read so far: {answer[:200]!r}") from None
            if not chunk:
                return answer
            answer += chunk


def metric(daemon: DaemonProcess, name: str) -> float:
    for line in daemon.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


@pytest.mark.parametrize("declared", [True, False])
def test_an_oversized_body_written_whole_gets_its_413(
    guarded: DaemonProcess, declared: bool
) -> None:
    body = b'{"readings": [' + b" " * (4 * MAX_BODY) + b"]}"
    if declared:
        head = f"Content-Length: {len(body)}\r\n".encode()
        payload = body
    else:  # chunked: refused while it streams in
        head = b"Transfer-Encoding: chunked\r\n"
        payload = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 8192]), body[i : i + 8192])
            for i in range(0, len(body), 8192)
        )
        payload += b"0\r\n\r\n"
    request = (
        b"POST /v1/ingestion/meter/batch HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + head
        + b"Content-Type: application/json\r\n\r\n"
        + payload
    )
    answer = raw_exchange(guarded.http_port, request)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"MAX_BODY_BYTES" in answer


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    guarded: DaemonProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", guarded.http_port), timeout=10) as sock:
        started = time.monotonic()
        answer = sock.recv(4096)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert 1.5 < elapsed < 5, elapsed


def test_a_slowloris_is_cut_off_and_health_answers_meanwhile(guarded: DaemonProcess) -> None:
    socks = [socket.create_connection(("127.0.0.1", guarded.http_port)) for _ in range(100)]
    try:
        for sock in socks:
            sock.sendall(b"POST /v1/ingestion/meter HTTP/1.1\r\nHost: x\r\n")
        cut: set[int] = set()
        started = time.monotonic()
        while len(cut) < len(socks) and time.monotonic() - started < 8:
            assert guarded.get("/health").status_code == 200
            for n, sock in enumerate(socks):
                if n in cut:
                    continue
                try:
                    sock.sendall(b"X-Slow: 1\r\n")  # a header line a second, never the end
                    sock.setblocking(False)
                    if sock.recv(4096).startswith(b"HTTP/1.1 408"):
                        cut.add(n)
                except BlockingIOError:
                    pass
                except OSError:
                    cut.add(n)
                finally:
                    sock.setblocking(True)
            time.sleep(0.5)
        assert len(cut) == len(socks)
        assert time.monotonic() - started < 6  # the header timeout (2 s), not the trickle
    finally:
        for sock in socks:
            sock.close()


def test_more_connections_than_the_bound_never_shut_health_out(guarded: DaemonProcess) -> None:
    socks = [socket.create_connection(("127.0.0.1", guarded.http_port)) for _ in range(900)]
    try:
        for _ in range(5):
            started = time.monotonic()
            assert guarded.get("/health").status_code == 200
            assert time.monotonic() - started < 2
        assert metric(guarded, "energy_ingest_http_connections") <= 300 + 5
        assert metric(guarded, "energy_ingest_http_idle_connections_closed_total") >= 600
    finally:
        for sock in socks:
            sock.close()


def test_a_client_hanging_up_mid_body_is_not_an_error(guarded: DaemonProcess) -> None:
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", guarded.http_port)) as sock:
            sock.sendall(
                b"POST /v1/ingestion/meter HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
                b'{"meterId": '
            )
    time.sleep(0.5)
    assert guarded.get("/health").status_code == 200
    log = guarded.log()
    assert "Traceback" not in log and " ERROR " not in log, log


@pytest.mark.parametrize(
    ("path", "status", "field"),
    [
        ("/v1/rejections?before=9223372036854775808", 400, "before"),
        ("/v1/rejections?before=-1", 400, "before"),
        ("/v1/rejections?before=%EF%BC%91%EF%BC%92", 400, "before"),  # full-width digits
        ("/v1/rejections?limit=1e3", 400, "limit"),
        ("/v1/rejections?source=%00", 400, "source"),
        ("/v1/analytics/performance/V-1?startTime=9999-12-31T23:59:59-01:00", 400, "startTime"),
        ("/v1/analytics/performance/V-1?endTime=0001-01-01T00:00:00%2B01:00", 400, "endTime"),
        ("/v1/analytics/performance/V-1?startTime=9999-12-31T23:00:00Z", 400, "startTime"),
        ("/v1/analytics/performance/V-1?endTime=0001-01-01T01:00:00Z", 400, "endTime"),
    ],
)
def test_parameters_at_their_limits_are_answered_in_words(
    guarded: DaemonProcess, path: str, status: int, field: str
) -> None:
    response = httpx.get(guarded.base_url + path, timeout=10)
    assert response.status_code == status, response.text
    assert response.json()["detail"][0]["field"] == field


@pytest.mark.parametrize("device", ["a%00b", "a%0Ab", "x" * 65, "%F0%9F%94%A5", "M-1%0A"])
def test_an_id_that_cannot_exist_is_404_in_words(guarded: DaemonProcess, device: str) -> None:
    for path in (f"/v1/status/meter/{device}", f"/v1/analytics/performance/{device}"):
        response = httpx.get(guarded.base_url + path, timeout=10)
        assert response.status_code == 404, response.text
        assert "22021" not in response.text and "DataError" not in response.text


GET_ROUTES = [
    "/v1/status/meter/{id}",
    "/v1/status/vehicle/{id}",
    "/v1/analytics/performance/{id}",
    "/v1/rejections",
    "/health",
    "/v1/analytics/fleet",
    "/v1/analytics/performance/{id}/series",
    "/v1/overview",
    "/v1/links",
]
PARAMETERS = [
    "limit",
    "before",
    "source",
    "startTime",
    "endTime",
    "x",
    "cursor",
    "alert",
    "format",
    "bucket",
    "vehicleId",
    "meterId",
    "startedBefore",
]
params = st.dictionaries(
    st.sampled_from(PARAMETERS),
    st.one_of(
        st.text(max_size=40),
        st.sampled_from(["true", "csv", "15m", "1d", "V-1", "eyJzdGFydCI6MX0", "0", ""]),
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.datetimes().map(lambda d: d.isoformat() + "+05:00"),
        st.sampled_from(["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "NaN"]),
        # The calendar's first and last days, to the microsecond (its last one is asyncpg's
        # `infinity`).
        st.one_of(
            st.datetimes(min_value=datetime(9999, 12, 30), timezones=st.just(UTC)),
            st.datetimes(max_value=datetime(1, 1, 2, 12), timezones=st.just(UTC)),
            st.just(datetime.max.replace(tzinfo=UTC)),
        ).map(lambda d: d.isoformat()),
    ),
    max_size=4,
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(route=st.sampled_from(GET_ROUTES), device=st.text(max_size=70), query=params)
def test_any_parameters_get_an_answer_never_a_5xx(
    guarded: DaemonProcess, route: str, device: str, query: dict[str, Any]
) -> None:
    path = route.replace("{id}", quote(device, safe="") or "x")
    qs = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in query.items())
    response = httpx.get(f"{guarded.base_url}{path}?{qs}", timeout=10)
    assert response.status_code < 500 or response.status_code == 503, (path, qs, response.text)
    if response.status_code >= 400:
        assert "detail" in response.json()


@pytest.mark.parametrize(
    "route",
    [
        "/v1/analytics/performance/V-1",
        "/v1/analytics/performance/V-1/series",
        "/v1/analytics/fleet",
        "/v1/analytics/fleet?format=csv",
    ],
)
@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        ("9999-12-31T00:00:00Z", "9999-12-31T23:59:59.999999Z", "endTime"),
        ("9999-12-31T22:00:00Z", "9999-12-31T23:30:00Z", "endTime"),
        ("0001-01-01T00:00:00Z", "0001-01-01T12:00:00Z", "startTime"),
    ],
)
def test_windows_at_the_ends_of_the_calendar_are_refused_in_words(
    guarded: DaemonProcess, route: str, start: str, end: str, field: str
) -> None:
    """Hours rounded outwards past the calendar overflowed (500), and its last microsecond
    reached PostgreSQL as `infinity` (a series of buckets that never ended: 10 s of a core)."""
    sep = "&" if "?" in route else "?"
    query = f"startTime={quote(start)}&endTime={quote(end)}"
    response = httpx.get(f"{guarded.base_url}{route}{sep}{query}", timeout=5)
    assert response.status_code == 400, response.text
    assert field in response.text


HOLD_CONNECTIONS = """
import socket, sys, time
port, count, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
held = []
for _ in range(count):
    try:
        held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    except OSError:
        pass
print(len(held), flush=True)
time.sleep(seconds)
"""


@pytest.mark.soak
async def test_twenty_thousand_idle_connections_do_not_stop_health(
    module_db: str, mosquitto: EmbeddedMosquitto, record: Callable[..., None]
) -> None:
    daemon = DaemonProcess(
        database_url=module_db, mqtt_url=mosquitto.url, http_header_timeout_s=30
    ).start()
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", HOLD_CONNECTIONS, str(daemon.http_port), "10000", "20"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        opened = []
        for holder in holders:
            assert holder.stdout is not None
            opened.append(int(await asyncio.to_thread(holder.stdout.readline)))
        assert sum(opened) >= 19_000, opened
        slowest = 0.0
        for _ in range(5):
            started = time.monotonic()
            response = await asyncio.to_thread(daemon.get, "/health")
            assert response.status_code == 200, response.text
            slowest = max(slowest, time.monotonic() - started)
            assert time.monotonic() - started < 3
        body = await asyncio.to_thread(
            lambda: httpx.post(
                daemon.base_url + "/v1/ingestion/meter",
                content=meter_json("IDLE-1", minutes_ago(1)),
                timeout=10,
            )
        )
        assert body.status_code == 201, body.text
        record(
            idle_connections_opened=sum(opened),
            slowest_health_s=round(slowest, 3),
            open_at_most=metric(daemon, "energy_ingest_http_connections"),
            idle_closed=metric(daemon, "energy_ingest_http_idle_connections_closed_total"),
        )
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
        assert daemon.stop() == 0, daemon.log()
