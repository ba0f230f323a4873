"""Fixtures that start real services, shared by every test that needs them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from daemon.services import EmbeddedMosquitto, EmbeddedPostgres
from db.partitions import prepare_schema
from tests.services import DaemonProcess, database_url, running_mosquitto, running_postgres

TEMPLATE_DB = "energy_template"
# Figures the fault, hostile-input and resource tests measure, written as JSON at the end of
# the session when RELIABILITY_REPORT names a file (RELIABILITY.md quotes them).
_FIGURES: dict[str, dict[str, Any]] = {}


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    def put(**figures: Any) -> None:
        _FIGURES.setdefault(request.node.nodeid, {}).update(figures)

    return put


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    report = os.environ.get("RELIABILITY_REPORT")
    if report:
        Path(report).write_text(json.dumps(_FIGURES, indent=2, default=str))


@pytest.fixture(scope="session", autouse=True)
def _one_temporary_folder() -> Iterator[Path]:
    """Every folder and file the tests make with `tempfile` (services' data, daemon logs)
    goes under one folder, removed when the session ends, so that runs leave nothing behind."""
    root = Path(tempfile.mkdtemp(prefix="energy-ingest-tests-"))
    root.chmod(0o755)  # the services may run as their own system users
    previous, tempfile.tempdir = tempfile.tempdir, str(root)
    try:
        yield root
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    with running_postgres() as pg:
        asyncio.run(_make_template(pg))
        yield pg


async def _make_template(pg: EmbeddedPostgres) -> None:
    admin = await asyncpg.connect(database_url(pg, "postgres"))
    await admin.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    await admin.close()
    conn = await asyncpg.connect(database_url(pg, TEMPLATE_DB))
    await prepare_schema(conn, schema="public", retention_days=30, lookahead_days=3)
    await conn.close()


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[EmbeddedMosquitto]:
    with running_mosquitto() as broker:
        yield broker


async def fresh_database(pg: EmbeddedPostgres, *, migrated: bool = True) -> str:
    """A new database for one test: a copy of the migrated template, or empty."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url(pg, "postgres"))
    template = f" TEMPLATE {TEMPLATE_DB}" if migrated else ""
    await admin.execute(f"CREATE DATABASE {name}{template}")
    await admin.close()
    return database_url(pg, name)


@pytest.fixture
async def db_url(postgres: EmbeddedPostgres) -> str:
    return await fresh_database(postgres)


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(db_url)
    yield connection
    await connection.close()


@pytest.fixture(scope="module")
async def module_db(postgres: EmbeddedPostgres) -> str:
    """One database for a test module that shares one daemon."""
    return await fresh_database(postgres)


@pytest.fixture(scope="module")
def daemon(module_db: str, mosquitto: EmbeddedMosquitto) -> Iterator[DaemonProcess]:
    """`energy-ingest run` as a child process on the module's database and the test broker."""
    process = DaemonProcess(database_url=module_db, mqtt_url=mosquitto.url).start()
    yield process
    assert process.stop() == 0, process.log()
