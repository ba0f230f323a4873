"""LOG_FORMAT=json: one JSON object a line with stable keys, whatever the message and the
context hold; and the real daemon, with its uvicorn, writes nothing else."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.database import _safe
from daemon.logs import CONTEXT, UVICORN, JsonFormatter, configure_logging
from daemon.services import EmbeddedMosquitto, EmbeddedPostgres
from tests.conftest import fresh_database
from tests.helpers import meter_json, minutes_ago
from tests.services import DaemonProcess, wait_until

STABLE = {"time", "level", "logger", "event"}
FAIL_METER_INSERTS = """
CREATE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'a value refused (a test)' USING ERRCODE = '22023'; END $$;
CREATE TRIGGER fail_insert BEFORE INSERT ON meter_readings
    FOR EACH ROW EXECUTE FUNCTION fail_insert()"""

values = st.one_of(
    st.none(),
    st.text(),
    st.integers(),
    st.floats(),  # NaN and infinities among them
    st.booleans(),
    st.binary(),
    st.lists(st.text(), max_size=3),
)


def _record(message: str, level: int, extra: dict[str, Any], failed: bool) -> logging.LogRecord:
    exc_info = None
    if failed:
        try:
            raise ValueError(message)
        except ValueError:
            exc_info = sys.exc_info()
    return logging.getLogger("ingest.test").makeRecord(
        "ingest.test", level, __file__, 1, message, (), exc_info, extra=extra
    )


def _check(line: str) -> dict[str, Any]:
    assert line.splitlines() == [line]  # one line: no break of any kind inside
    entry = json.loads(line)
    assert isinstance(entry, dict) and set(entry) >= STABLE, line
    assert set(entry) <= STABLE | set(CONTEXT) | {"exc", "stack"}, line
    assert entry["time"].endswith("Z")
    assert datetime.fromisoformat(entry["time"]).utcoffset() is not None
    return entry


@given(
    message=st.text(),
    level=st.sampled_from([logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]),
    extra=st.dictionaries(st.sampled_from(CONTEXT), values),
    failed=st.booleans(),
)
def test_every_record_is_one_line_of_json_with_the_stable_keys(
    message: str, level: int, extra: dict[str, Any], failed: bool
) -> None:
    record = _record(message, level, extra, failed)
    entry = _check(JsonFormatter().format(record))
    assert entry["event"] == message
    assert entry["level"] == logging.getLevelName(level)
    assert entry["logger"] == "ingest.test"
    assert datetime.fromisoformat(entry["time"]).timestamp() == pytest.approx(
        record.created, abs=0.001
    )
    for key, value in extra.items():
        if value is None or value == "":
            assert key not in entry
        elif isinstance(value, str | bool | int):
            assert entry[key] == value
        else:
            assert isinstance(entry[key], str | float)
    assert ("exc" in entry) == failed
    if failed:
        assert "ValueError" in entry["exc"] and "Traceback" in entry["exc"]


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root's and uvicorn's loggers as they were, after the test."""
    names = ["", *UVICORN]
    loggers = [logging.getLogger(name) for name in names]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    try:
        yield
    finally:
        for name, (handlers, level, propagate) in zip(names, saved, strict=True):
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
        logging.captureWarnings(False)


def test_json_is_chosen_by_log_format_and_text_stays_the_default(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    logging.getLogger("ingest.flushing").warning(
        "PostgreSQL refused a flush", extra={"sqlstate": "23514", "cause": "23514"}
    )
    logging.getLogger("ingest.flushing").debug("below the level")
    lines = capsys.readouterr().err.splitlines()
    assert [_check(line)["logger"] for line in lines] == ["uvicorn.error", "ingest.flushing"]
    assert json.loads(lines[1])["sqlstate"] == "23514"

    configure_logging("INFO", "text")
    logging.getLogger("ingest.flushing").warning("plain", extra={"sqlstate": "23514"})
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(" WARNING ingest.flushing: plain")


@given(
    user=st.text(max_size=8),
    password=st.text(max_size=12),
    where=st.sampled_from(["userinfo", "query", "Query"]),
)
def test_urls_are_logged_without_their_password(user: str, password: str, where: str) -> None:
    secret = quote("pw~" + password, safe="")  # "pw~": nowhere else in the URL
    name = quote(user, safe="")
    if where == "userinfo":
        url = f"postgresql://{name}:{secret}@db1:5432,db2/energy?sslmode=require"
    else:
        key = "password" if where == "query" else "PassWord"
        url = f"postgresql://db1:5432/energy?user={name}&{key}={secret}&sslmode=require"
    shown = _safe(url)
    assert "pw~" not in shown and "pw%7E" not in shown
    assert "db1:5432" in shown and shown.endswith("sslmode=require")


async def test_the_daemon_logs_only_json_lines_with_their_context(
    postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto
) -> None:
    url = await fresh_database(postgres)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(FAIL_METER_INSERTS)  # every meter reading: a value refused
    finally:
        await conn.close()
    daemon = DaemonProcess(database_url=url, mqtt_url=mosquitto.url, log_format="json").start()
    try:
        answer = httpx.post(
            daemon.base_url + "/v1/ingestion/meter",
            content=meter_json("LOG-M1", minutes_ago(1)),
            timeout=10,
        )
        assert answer.status_code < 500, answer.text
        with socket.create_connection(("127.0.0.1", daemon.http_port), timeout=5) as raw:
            raw.sendall(b"\x00\x01 not http\r\n\r\n")  # uvicorn's parser refuses it
            raw.recv(4096)
        wait_until(lambda: "Invalid HTTP request" in daemon.log_path.read_text())
    finally:
        assert daemon.stop() == 0, daemon.log()
    lines = daemon.log_path.read_text().splitlines()
    entries = [_check(line) for line in lines]
    assert len(entries) >= 5
    (refused,) = [e for e in entries if "recording the reading as refused" in e["event"]]
    assert refused["level"] == "WARNING" and refused["logger"] == "ingest.flushing"
    assert {k: refused[k] for k in CONTEXT} == {
        "stream": "meter",
        "device": "LOG-M1",
        "transport": "http",
        "sqlstate": "22023",
        "cause": "22023",
    }
    assert any(e["logger"] == "uvicorn.error" for e in entries)
    mqtt = [e for e in entries if e["logger"] == "broker.subscriber"]
    assert mqtt and all(e["transport"] == "mqtt" for e in mqtt)
    assert any(e["event"].startswith("MQTT subscribed") for e in mqtt)
    assert datetime.fromisoformat(entries[0]["time"]) <= datetime.now(UTC)


@pytest.mark.parametrize(
    ("env", "args", "said"),
    [
        ({"HTTP_PORT": "abc"}, ["run"], "HTTP_PORT"),
        ({}, ["rebuild-rollups", "2026-02-01T00:00Z", "2026-01-01T00:00Z"], "START must come"),
    ],
)
def test_a_command_that_cannot_go_on_says_why_in_json_too(
    env: dict[str, str], args: list[str], said: str, tmp_path: Path
) -> None:
    """Its last word is a log line like the others, not a line of plain text."""
    environment = {**os.environ, **env, "LOG_FORMAT": "json"}
    ended = subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        env=environment,
        cwd=tmp_path,  # (no .env of the checkout)
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ended.returncode == 1, ended.stderr
    entries = [_check(line) for line in ended.stderr.splitlines()]
    (last,) = [e for e in entries if said in e["event"]]
    assert last["level"] == "CRITICAL" and last["logger"] == "energy-ingest"
