"""A private PostgreSQL cluster for `make run` and the tests (when DATABASE_URL is unset):
its own folder (`var/postgres` by default), loopback only, trust authentication (local
development only), stopped by whoever started it."""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from daemon.services.processes import (
    START_TIMEOUT_S,
    ServiceError,
    choose_port,
    owned_folder,
    run_as,
    run_as_owner,
)

log = logging.getLogger(__name__)

PG_SUPERUSER = "postgres"
PG_DATABASE = "energy"


def postgres_bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[4]) if Path(p).parts[4].isdigit() else 0,
    )
    if not candidates:
        raise ServiceError(
            "PostgreSQL server binaries not found (initdb). On Debian/Ubuntu: "
            "apt-get install postgresql; or set DATABASE_URL to an existing server"
        )
    return Path(candidates[-1]).parent


@dataclass(frozen=True, slots=True)
class ServerTls:
    """A certificate and key for a TLS-only listener (PostgreSQL accepts nothing else)."""

    cert_file: Path
    key_file: Path


class EmbeddedPostgres:
    """A private PostgreSQL cluster under `root`, on loopback, trust auth (local dev only);
    with `tls`, it takes only TLS connections over TCP."""

    def __init__(
        self,
        root: Path,
        *,
        port: int,
        fsync: bool = True,
        tls: ServerTls | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.owner = run_as("postgres")
        self.root = owned_folder(root, self.owner)
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log_file = self.root / "postgres.log"
        self._wanted_port = port
        self._fsync = fsync
        self._tls = tls
        self._settings = settings or {}  # more server settings, after (over) the ones above
        self.port = 0
        self._bin = postgres_bindir()

    @property
    def dsn(self) -> str:
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self.port}/{PG_DATABASE}"

    def start(self) -> str:
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        if not self.sockets.exists():  # (a data folder made by pg_basebackup, say)
            self.sockets.mkdir()
            if self.owner.is_other:
                os.chown(self.sockets, self.owner.uid, self.owner.gid)
        running = self._running_port()
        if running is not None:
            self.port = running
            log.info("private PostgreSQL already running on port %d", running)
        else:
            self.port = choose_port(self._wanted_port, "PostgreSQL")
            self._pg_ctl_start()
        self._wanted_port = self.port  # a restart comes back where clients expect it
        self._create_database()
        log.info("private PostgreSQL at %s (data in %s)", self.dsn, self.data)
        return self.dsn

    def stop(self) -> None:
        result = self.pg_ctl("-m", "fast", "-w", "stop")
        if result.returncode not in (0, 3):  # 3: was not running
            log.warning("pg_ctl stop: %s", result.stderr.strip())

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`pg_ctl -D <data> ARGS` as the cluster's owner (promote, stop...)."""
        return run_as_owner([str(self._bin / "pg_ctl"), "-D", str(self.data), *args], self.owner)

    def run_tool(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Another of PostgreSQL's programs (pg_basebackup...) as the cluster's owner."""
        return run_as_owner([str(self._bin / tool), *args], self.owner)

    def _initdb(self) -> None:
        self.data.mkdir(exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self.owner.is_other:
            for path in (self.data, self.sockets):
                os.chown(path, self.owner.uid, self.owner.gid)
        args = [
            str(self._bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            PG_SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]
        if not self._fsync:
            args.append("--no-sync")
        result = run_as_owner(args, self.owner)
        if result.returncode != 0:
            raise ServiceError(f"initdb failed: {result.stderr.strip()}")

    def _running_port(self) -> int | None:
        status = run_as_owner(
            [str(self._bin / "pg_ctl"), "-D", str(self.data), "status"], self.owner
        )
        if status.returncode != 0:
            return None
        lines = (self.data / "postmaster.pid").read_text().splitlines()
        return int(lines[3])

    def _pg_ctl_start(self) -> None:
        options = [
            f"-p {self.port}",
            f"-k {self.sockets}",
            "-c listen_addresses=127.0.0.1",
            "-c max_connections=200",
            # PostgreSQL's default (128 MB) is sized for any machine; a day of a 2,000-device
            # fleet's history indexes alone is about 110 MB.
            "-c shared_buffers=512MB",
        ]
        if not self._fsync:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        if self._tls is not None:
            cert, key = self._tls_files()
            options += ["-c ssl=on", f"-c ssl_cert_file={cert}", f"-c ssl_key_file={key}"]
        options += [f"-c {name}={value}" for name, value in self._settings.items()]
        args = [
            str(self._bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(int(START_TIMEOUT_S)),
            "-o",
            " ".join(options),
            "start",
        ]
        # A session of its own: Ctrl-C at the terminal must not reach PostgreSQL before the
        # daemon has flushed; the daemon stops it afterwards.
        result = run_as_owner(args, self.owner, start_new_session=True)
        if result.returncode != 0:
            tail = self.log_file.read_text()[-2000:] if self.log_file.exists() else ""
            raise ServiceError(f"PostgreSQL did not start: {result.stderr.strip()}\n{tail}")

    def _tls_files(self) -> tuple[Path, Path]:
        """The certificate and key in the data folder, the key readable by its owner alone
        (PostgreSQL refuses it otherwise); TCP clients must use TLS (pg_hba.conf)."""
        assert self._tls is not None
        copies = (self.data / "server.crt", self.data / "server.key")
        for source, copy in zip((self._tls.cert_file, self._tls.key_file), copies, strict=True):
            shutil.copyfile(source, copy)
            copy.chmod(0o600)
            if self.owner.is_other:
                os.chown(copy, self.owner.uid, self.owner.gid)
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 trust\n"
            "hostnossl all all 0.0.0.0/0 reject\n"
        )
        return copies

    def _create_database(self) -> None:
        psql = [
            str(self._bin / "psql"),
            "-h",
            str(self.sockets),  # (its own socket: TCP may take TLS only)
            "-p",
            str(self.port),
            "-U",
            PG_SUPERUSER,
            "-d",
            "postgres",
            "-tA",
            "-v",
            "ON_ERROR_STOP=1",
        ]
        exists = run_as_owner(
            [*psql, "-c", f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'"], self.owner
        )
        if exists.stdout.strip() != "1":
            created = run_as_owner([*psql, "-c", f"CREATE DATABASE {PG_DATABASE}"], self.owner)
            if created.returncode != 0 and "already exists" not in created.stderr:
                raise ServiceError(f"cannot create database: {created.stderr.strip()}")
