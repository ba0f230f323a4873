"""Faults put on the right party (SPEC §4, STYLE "whose fault is it?"): an error of our own
code is a 500 with no internals, logged once with its traceback and counted, never "the
database is unavailable"; PostgreSQL refusing the daemon for a reason that waiting cannot
mend (a password, a role, a database, a permission) ends it at start with an ERROR naming
the cause; any malformed Authorization header is a 401; gzip bodies are accepted within the
body limit (decompressed), other encodings refused; rejection records waiting for a database
that is away are bounded and never take a valid reading's room."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import logging
import subprocess
import sys
import uuid
import zlib
from collections.abc import AsyncIterator, MutableMapping
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.app import App, create_app
from api.runtime import BrokerStatus, Runtime
from daemon.services import EmbeddedMosquitto, EmbeddedPostgres
from db.errors import TransientFailure
from db.pool import create_pool
from db.probe import DatabaseStatus
from db.writes import FlushBatch, RejectionRow, Stored
from ingest.batches import Submission
from ingest.config import Settings
from ingest.flushing import PoolFlush
from ingest.housekeeping import UpkeepStatus
from ingest.readings import Limits
from ingest.writer import REJECTIONS_WAITING_MAX, Writer
from tests.conftest import fresh_database
from tests.helpers import meter_json, minutes_ago
from tests.services import REPO, database_url

OPERATOR_KEY = "op-key"
INGEST_KEY = "in-key"


class BrokenPool:
    """A pool whose code fails the way a bug of ours would (not the database)."""

    def acquire(self, **_: Any) -> Any:
        raise KeyError("a key our code forgot")


@pytest.fixture
async def app(db_url: str) -> AsyncIterator[App]:
    settings = Settings(
        database_url=db_url,
        operator_api_keys=OPERATOR_KEY,
        ingest_api_keys=INGEST_KEY,
        max_body_bytes=4096,
    )
    pool = await create_pool(db_url, schema="public", max_size=2)
    writer = Writer(
        PoolFlush(pool), flush_max_readings=100, flush_interval_s=0.002, buffer_max_readings=100
    )
    task = asyncio.create_task(writer.run())
    runtime = Runtime(
        settings=settings,
        writer=writer,
        limits=Limits(retention=timedelta(days=30), future_skew=timedelta(minutes=5)),
        read_pool=BrokenPool(),
        control_pool=pool,
        broker_status=lambda: BrokerStatus(True, ""),
        upkeep_status=UpkeepStatus,
        database_status=lambda: DatabaseStatus("up", ""),
    )
    yield create_app(runtime)
    writer.stop()
    await task
    await pool.close()


def client(app: App) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://daemon")


async def test_an_error_of_ours_is_a_500_logged_once_and_counted(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    with caplog.at_level(logging.ERROR):
        async with client(app) as http:
            answers = [await http.get("/v1/status/meter/M-1", headers=headers) for _ in range(3)]
            metrics = (await http.get("/metrics")).text
    for answer in answers:
        assert answer.status_code == 500
        assert answer.json() == {"detail": "internal error; the daemon logged it"}
        assert "KeyError" not in answer.text and "database" not in answer.text
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, [r.getMessage() for r in caplog.records]
    assert 'energy_ingest_internal_errors_total{where="http"} 3.0' in metrics


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=st.binary(min_size=0, max_size=80))
def test_any_malformed_authorization_header_is_401(app: App, value: bytes) -> None:
    """Whatever bytes the header holds (non-ASCII, control characters, a key's prefix...)."""

    async def ask() -> tuple[int, Any]:
        sent: list[dict[str, Any]] = []
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "GET",
            "path": "/v1/rejections",
            "raw_path": b"/v1/rejections",
            "query_string": b"",
            "headers": [(b"authorization", value), (b"host", b"daemon")],
        }

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        await app(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], orjson.loads(body)

    status, body = asyncio.run(ask())
    if value.strip() == f"Bearer {OPERATOR_KEY}".encode():
        assert status == 500  # (the key is right; the broken read pool answers)
    else:
        assert status == 401, (value, status, body)
        assert "detail" in body


@pytest.mark.parametrize(
    ("encoding", "body", "status"),
    [
        ("gzip", gzip.compress(meter_json("GZ-1", minutes_ago(1))), 201),
        ("gzip", gzip.compress(b" " * 100_000 + meter_json("GZ-2", minutes_ago(1))), 413),
        ("gzip", b"\x1f\x8b not gzip at all", 400),
        ("gzip", gzip.compress(meter_json("GZ-3", minutes_ago(1)))[:-6], 400),
        ("deflate", zlib.compress(meter_json("GZ-4", minutes_ago(1))), 415),
        ("br", b"whatever", 415),
        ("identity", meter_json("GZ-5", minutes_ago(1)), 201),
    ],
)
async def test_gzip_bodies_within_the_limit_decompressed_other_encodings_refused(
    app: App, encoding: str, body: bytes, status: int
) -> None:
    async with client(app) as http:
        answer = await http.post(
            "/v1/ingestion/meter",
            content=body,
            headers={"Content-Encoding": encoding, "Authorization": f"Bearer {INGEST_KEY}"},
        )
    assert answer.status_code == status, answer.text
    if status == 413:
        assert "decompressed" in answer.text and "MAX_BODY_BYTES" in answer.text


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(cuts=st.lists(st.integers(0, 200), max_size=4), tail=st.sampled_from([b"", b"x", b"\0"]))
async def test_a_gzip_body_of_several_members_is_one_body(
    app: App, cuts: list[int], tail: bytes
) -> None:
    """Members one after the other (RFC 1952; `gzip -c a b`) decompress to one body, as
    gunzip reads them; bytes after a member that are not another are 400. Only the first
    member was read once: a batch split across two got "unexpected end of data", and
    anything after the first member was silently ignored."""
    body = meter_json(f"GZM-{uuid.uuid4().hex[:8]}", minutes_ago(1))
    edges = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    members = b"".join(gzip.compress(body[a:b]) for a, b in itertools.pairwise(edges))
    async with client(app) as http:
        answer = await http.post(
            "/v1/ingestion/meter",
            content=members + tail,
            headers={"Content-Encoding": "gzip", "Authorization": f"Bearer {INGEST_KEY}"},
        )
    assert answer.status_code == (201 if not tail else 400), answer.text


async def test_a_gzip_body_of_too_many_members_is_refused_at_once(app: App) -> None:
    """4 MiB of empty members once took 0.74 s of the event loop (a decompressor and a copy
    of the rest for each)."""
    body = gzip.compress(b"") * 100 + gzip.compress(meter_json("GZ-MM", minutes_ago(1)))
    async with client(app) as http:
        answer = await http.post(
            "/v1/ingestion/meter",
            content=body,
            headers={"Content-Encoding": "gzip", "Authorization": f"Bearer {INGEST_KEY}"},
        )
    assert answer.status_code == 400 and "gzip members" in answer.text, answer.text


async def test_two_content_encoding_headers_are_one_list(app: App) -> None:
    """`Content-Encoding: gzip` twice is "gzip, gzip" (RFC 9110 §5.3), refused as such."""
    body = gzip.compress(gzip.compress(meter_json("GZ-2H", minutes_ago(1))))
    async with client(app) as http:
        answer = await http.post(
            "/v1/ingestion/meter",
            content=body,
            headers=[
                ("Content-Encoding", "gzip"),
                ("Content-Encoding", "gzip"),
                ("Authorization", f"Bearer {INGEST_KEY}"),
            ],
        )
    assert answer.status_code == 415, answer.text


async def test_rejection_records_waiting_for_the_database_are_bounded() -> None:
    """The database away: records of invalid input wait up to a bound, then are dropped and
    counted, and never fill the buffer a valid reading needs."""

    async def away(batch: FlushBatch) -> dict[str, Stored]:
        raise TransientFailure("08006 connection lost", sqlstate="08006")

    writer = Writer(away, flush_max_readings=100, flush_interval_s=0.001, buffer_max_readings=10)
    task = asyncio.create_task(writer.run())
    try:
        settled: list[int] = []
        record = RejectionRow(minutes_ago(0), "http", "POST /v1/ingest", "{}", "bad")
        for _ in range(REJECTIONS_WAITING_MAX * 3):
            writer.submit(Submission([], [record], lambda _: settled.append(1), "http"))
            await asyncio.sleep(0)
        assert writer.depth == 0  # no reading's room taken
        assert len(settled) == REJECTIONS_WAITING_MAX * 2  # dropped, settled, counted
        unrecorded = writer.metrics.registry.get_sample_value(
            "energy_ingest_rejections_unrecorded_total"
        )
        assert unrecorded == REJECTIONS_WAITING_MAX * 2
    finally:
        writer.stop()
        task.cancel()


async def start_fails(url: str, mosquitto: EmbeddedMosquitto) -> tuple[int, str]:
    env = {"DATABASE_URL": url, "MQTT_URL": mosquitto.url, "LOG_LEVEL": "INFO"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        "run",
        cwd=REPO,
        env={**__import__("os").environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, output.decode(errors="replace")


async def test_what_waiting_cannot_mend_ends_the_start_with_the_cause(
    postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto
) -> None:
    url = await fresh_database(postgres)
    admin = await asyncpg.connect(url)
    role = f"weak_{uuid.uuid4().hex[:6]}"
    name = url.rsplit("/", 1)[1]
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"CREATE ROLE {role}_pw LOGIN PASSWORD 'right'")
        hba = postgres.data / "pg_hba.conf"  # (that role alone must give a password)
        hba.write_text(f"host all {role}_pw 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        await admin.execute("SELECT pg_reload_conf()")
        await admin.execute(f"REVOKE ALL ON SCHEMA public FROM PUBLIC, {role}")
        await admin.execute(f"REVOKE ALL ON DATABASE {name} FROM PUBLIC")
        await admin.execute(f"GRANT CONNECT ON DATABASE {name} TO {role}")
        base = database_url(postgres, "x").rsplit("/", 1)[0]
        cases = {
            "3D000": database_url(postgres, f"missing_{uuid.uuid4().hex[:6]}"),
            "28000": base.replace("postgres@", "nobody_such@") + f"/{name}",
            "42501": base.replace("postgres@", f"{role}@") + f"/{name}",
            "28P01": base.replace("postgres@", f"{role}_pw:wrong@") + f"/{name}",
        }
        for cause, broken in cases.items():
            code, output = await start_fails(broken, mosquitto)
            assert code != 0, output[-2000:]
            errors = [line for line in output.splitlines() if " ERROR " in line]
            assert errors and cause in errors[-1], output[-2000:]
            assert "waiting for PostgreSQL" not in output
    finally:
        await admin.close()
