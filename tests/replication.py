"""A primary and a streaming standby of real PostgreSQL, for the failover, switchover and
replica tests: the standby made by `pg_basebackup`, synchronous or not, promoted by
`pg_ctl promote`, and a primary killed as a crash would (SIGKILL to every process of it)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from daemon.services import EmbeddedPostgres, free_port
from tests.services import service_root

STANDBY_NAME = "standby1"


PRIMARY_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "5",
    "wal_keep_size": "256MB",
    "synchronous_commit": "on",
}


async def make_synchronous(primary_dsn: str) -> None:
    """From now on a commit on the primary returns only once the standby has its WAL on disk
    (set once the standby streams: before, every commit would wait for it)."""
    conn = await asyncpg.connect(primary_dsn)
    try:
        await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
        await conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30
        while (
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
            )
            != 1
        ):
            assert time.monotonic() < deadline, "the standby did not become synchronous"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def make_standby(primary: EmbeddedPostgres, root: Path) -> EmbeddedPostgres:
    """A hot standby of `primary` under `root`, streaming from it, started."""
    standby = EmbeddedPostgres(root / "postgres", port=0, fsync=False, settings={})
    standby.data.parent.mkdir(parents=True, exist_ok=True)
    result = primary.run_tool(
        "pg_basebackup",
        "-h",
        "127.0.0.1",
        "-p",
        str(primary.port),
        "-U",
        "postgres",
        "-D",
        str(standby.data),
        "-X",
        "stream",
        "--checkpoint=fast",
    )
    assert result.returncode == 0, result.stderr
    follow(standby, primary.port)
    standby.start()
    return standby


def follow(node: EmbeddedPostgres, primary_port: int) -> None:
    """Make `node`'s data a standby of the primary on `primary_port` (before it starts)."""
    (node.data / "standby.signal").write_text("")
    conninfo = f"host=127.0.0.1 port={primary_port} user=postgres application_name={STANDBY_NAME}"
    with (node.data / "postgresql.auto.conf").open("a") as conf:
        conf.write(f"primary_conninfo = '{conninfo}'\nhot_standby = on\n")
    (node.data / "postmaster.pid").unlink(missing_ok=True)
    if node.owner.is_other:
        for name in ("standby.signal", "postgresql.auto.conf"):
            os.chown(node.data / name, node.owner.uid, node.owner.gid)


def kill_hard(node: EmbeddedPostgres) -> None:
    """SIGKILL to the postmaster and every process it started: a crash of the server."""
    postmaster = int((node.data / "postmaster.pid").read_text().split()[0])
    children = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _parent(int(entry.name)) == postmaster
    ]
    for pid in (postmaster, *children):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in (postmaster, *children)
    ):
        time.sleep(0.05)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def promote(node: EmbeddedPostgres) -> None:
    result = node.pg_ctl("promote", "-w", "-t", "60")
    assert result.returncode == 0, result.stderr


@dataclass
class Pair:
    primary: EmbeddedPostgres
    standby: EmbeddedPostgres

    def url(self, *, database: str = "energy") -> str:
        """Both hosts, the primary first; the one taking writes is chosen (libpq's way)."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"


@asynccontextmanager
async def replicated_postgres(*, synchronous: bool) -> AsyncIterator[Pair]:
    """A primary and its streaming standby (the database `energy` on both), stopped at the
    end whatever became of them."""
    primary = EmbeddedPostgres(
        service_root("pg-primary") / "postgres",
        port=free_port(),
        fsync=False,
        settings=PRIMARY_SETTINGS,
    )
    primary.start()
    standby: EmbeddedPostgres | None = None
    try:
        standby = make_standby(primary, service_root("pg-standby"))
        if synchronous:
            await make_synchronous(primary.dsn)
        yield Pair(primary, standby)
    finally:
        for node in (standby, primary):
            if node is not None:
                node.stop()


async def wait_replayed(primary_dsn: str, standby_dsn: str, timeout_s: float = 30) -> None:
    """Until the standby has replayed everything the primary has written so far."""
    primary = await asyncpg.connect(primary_dsn)
    standby = await asyncpg.connect(standby_dsn)
    try:
        target = await primary.fetchval("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + timeout_s
        while True:
            done = await standby.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", target)
            if done:
                return
            assert time.monotonic() < deadline, "the standby did not catch up"
            await asyncio.sleep(0.05)
    finally:
        await primary.close()
        await standby.close()
