"""Private PostgreSQL and Mosquitto instances for `make run` and the tests.

Used when DATABASE_URL / MQTT_URL are not set: each service lives in a folder of its own
(`var/postgres`, `var/mosquitto` by default), listens on loopback only, and is stopped by
whoever started it. PostgreSQL refuses to run as root, so when we are root both services run
as their Debian system users (`postgres`, `mosquitto`), owning their folders.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PG_SUPERUSER = "postgres"
PG_DATABASE = "energy"
START_TIMEOUT_S = 60.0
REPO_ROOT = Path(__file__).resolve().parent.parent
# The top-level mosquitto.conf: beside the packages in a checkout, under the environment's
# share/ when installed from a wheel (pyproject.toml's data-files).
MOSQUITTO_CONF_PLACES = (
    REPO_ROOT / "mosquitto.conf",
    Path(sys.prefix) / "share" / "energy-ingest" / "mosquitto.conf",
)


def shipped_mosquitto_conf() -> Path:
    for place in MOSQUITTO_CONF_PLACES:
        if place.is_file():
            return place
    places = ", ".join(str(p) for p in MOSQUITTO_CONF_PLACES)
    raise ServiceError(f"mosquitto.conf not found (looked in {places}): reinstall the package")


# Lines of the shipped mosquitto.conf that describe a deployment (where to listen, files,
# who may connect); the private broker replaces them and keeps every delivery setting.
_DEPLOYMENT_KEYS = {
    "listener",
    "persistence_location",
    "password_file",
    "acl_file",
    "allow_anonymous",
    "log_dest",
    "pid_file",
    "user",
    "log_type",
    "per_listener_settings",
    "use_username_as_clientid",
    "cafile",
    "certfile",
    "keyfile",
    "require_certificate",
    "tls_version",
}


class ServiceError(RuntimeError):
    """A private service could not be set up; the message says what to do about it."""


@dataclass(frozen=True, slots=True)
class RunAs:
    uid: int
    gid: int
    name: str

    @property
    def is_other(self) -> bool:
        return self.uid != os.geteuid()


def run_as(system_user: str) -> RunAs:
    """Root runs services as their system user; anyone else runs them as themselves."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return RunAs(me.pw_uid, me.pw_gid, me.pw_name)
    try:
        entry = pwd.getpwnam(system_user)
    except KeyError:
        raise ServiceError(
            f"running as root needs the unprivileged system user {system_user!r} "
            f"(Debian's package creates it; or: useradd --system {system_user})"
        ) from None
    return RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As the servers do: a port in TIME_WAIT after a restart still counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def choose_port(wanted: int, what: str) -> int:
    if wanted == 0:
        return free_port()
    if port_is_free(wanted):
        return wanted
    port = free_port()
    log.warning("port %d for the private %s is taken; using %d instead", wanted, what, port)
    return port


def wait_for_port(port: int, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise ServiceError(f"the private {what} did not start listening on port {port}")


def owned_folder(path: Path, owner: RunAs) -> Path:
    """Create `path` for `owner`. A folder the owner cannot reach (under /root, say) is
    replaced by a link to one under /var/tmp that it can."""
    path = path.resolve()
    if owner.is_other and not _reachable_by_others(path.parent):
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
        target = Path("/var/tmp/energy-ingest") / f"{path.name}-{digest}"
        target.mkdir(parents=True, exist_ok=True)
        Path("/var/tmp/energy-ingest").chmod(0o755)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_symlink():
            path.symlink_to(target)
        path = target
    path.mkdir(parents=True, exist_ok=True)
    if owner.is_other:
        os.chown(path, owner.uid, owner.gid)
    return path


def _reachable_by_others(path: Path) -> bool:
    for folder in [path, *path.parents]:
        if folder.exists() and not folder.stat().st_mode & 0o001:
            return False
    return True


def _run(args: list[str], owner: RunAs, **kwargs: object) -> subprocess.CompletedProcess[str]:
    user = owner.uid if owner.is_other else None
    group = owner.gid if owner.is_other else None
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        args, user=user, group=group, text=True, capture_output=True, **kwargs
    )


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
        return _run([str(self._bin / "pg_ctl"), "-D", str(self.data), *args], self.owner)

    def run_tool(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Another of PostgreSQL's programs (pg_basebackup...) as the cluster's owner."""
        return _run([str(self._bin / tool), *args], self.owner)

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
        result = _run(args, self.owner)
        if result.returncode != 0:
            raise ServiceError(f"initdb failed: {result.stderr.strip()}")

    def _running_port(self) -> int | None:
        status = _run([str(self._bin / "pg_ctl"), "-D", str(self.data), "status"], self.owner)
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
        result = _run(args, self.owner, start_new_session=True)
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
        exists = _run(
            [*psql, "-c", f"SELECT 1 FROM pg_database WHERE datname = '{PG_DATABASE}'"], self.owner
        )
        if exists.stdout.strip() != "1":
            created = _run([*psql, "-c", f"CREATE DATABASE {PG_DATABASE}"], self.owner)
            if created.returncode != 0 and "already exists" not in created.stderr:
                raise ServiceError(f"cannot create database: {created.stderr.strip()}")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if not found:
        raise ServiceError(
            "Mosquitto not found. On Debian/Ubuntu: apt-get install mosquitto mosquitto-clients; "
            "or set MQTT_URL to an existing broker"
        )
    return found


@dataclass(frozen=True, slots=True)
class BrokerAuth:
    """Password file and ACL for a private broker that checks credentials like a deployment
    (and, as the shipped one, makes each client's id its user name)."""

    password_file: Path
    acl_file: Path


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """A TLS listener beside the plain one (its port chosen at start)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = False


def private_broker_config(
    shipped: str,
    *,
    port: int,
    data: Path,
    log_file: Path,
    pid_file: Path,
    user: str,
    auth: BrokerAuth | None = None,
    tls: BrokerTls | None = None,
    tls_port: int = 0,
) -> str:
    """The shipped delivery settings, with a loopback listener and local files."""
    kept = []
    for line in shipped.splitlines():
        words = line.split()
        if words and not words[0].startswith("#") and words[0] in _DEPLOYMENT_KEYS:
            continue
        kept.append(line)
    kept += [
        "",
        "# --- private broker of `make run` / the tests (generated) ---",
        f"user {user}",
        f"pid_file {pid_file}",
        f"persistence_location {data}/",
        f"log_dest file {log_file}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        f"listener {port} 127.0.0.1",
    ]
    if auth is None:
        kept += [
            "# Demo mode: anonymous devices may publish. Deployments use the shipped file as is.",
            "allow_anonymous true",
        ]
    else:
        kept += [
            "use_username_as_clientid true",
            "allow_anonymous false",
            f"password_file {auth.password_file}",
            f"acl_file {auth.acl_file}",
        ]
    if tls is not None:
        kept += [
            f"listener {tls_port} 127.0.0.1",
            f"cafile {tls.ca_file}",
            f"certfile {tls.cert_file}",
            f"keyfile {tls.key_file}",
            f"require_certificate {'true' if tls.require_certificate else 'false'}",
        ]
        if auth is not None:
            kept.append("use_username_as_clientid true")
    return "\n".join(kept) + "\n"


class EmbeddedMosquitto:
    """A private Mosquitto under `root`, on loopback: anonymous (demo mode), or with the
    password file and ACL of `auth` (copied into its folder, readable by its user alone, as
    Mosquitto reads them after dropping root), and a TLS listener with `tls`."""

    def __init__(
        self,
        root: Path,
        *,
        port: int,
        auth: BrokerAuth | None = None,
        tls: BrokerTls | None = None,
    ) -> None:
        self.owner = run_as("mosquitto")
        self.auth = auth
        self.tls = tls
        self.tls_port = 0
        self.root = owned_folder(root, self.owner)
        self.data = self.root / "data"
        self.conf = self.root / "mosquitto.conf"
        self.pid_file = self.root / "mosquitto.pid"
        self.log_file = self.root / "mosquitto.log"
        self._wanted_port = port
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _own_copy(self, source: Path) -> Path:
        copy = self.root / f"{source.name}.broker"
        shutil.copyfile(source, copy)
        copy.chmod(0o600)
        if self.owner.is_other:
            os.chown(copy, self.owner.uid, self.owner.gid)
        return copy

    def _copies(self) -> tuple[BrokerAuth | None, BrokerTls | None]:
        auth = tls = None
        if self.auth is not None:
            auth = BrokerAuth(
                self._own_copy(self.auth.password_file), self._own_copy(self.auth.acl_file)
            )
        if self.tls is not None:
            tls = BrokerTls(
                self._own_copy(self.tls.ca_file),
                self._own_copy(self.tls.cert_file),
                self._own_copy(self.tls.key_file),
                self.tls.require_certificate,
            )
        return auth, tls

    def start(self) -> str:
        binary = mosquitto_binary()
        self._stop_leftover()
        self.port = choose_port(self._wanted_port, "Mosquitto")
        self._wanted_port = self.port
        if self.tls is not None and not self.tls_port:
            self.tls_port = free_port()
        self.data.mkdir(exist_ok=True)
        auth, tls = self._copies()
        self.conf.write_text(
            private_broker_config(
                shipped_mosquitto_conf().read_text(),
                port=self.port,
                data=self.data,
                log_file=self.log_file,
                pid_file=self.pid_file,
                user=self.owner.name,
                auth=auth,
                tls=tls,
                tls_port=self.tls_port,
            )
        )
        for path in (self.data, self.conf):
            if self.owner.is_other:
                os.chown(path, self.owner.uid, self.owner.gid)
        self._process = subprocess.Popen(
            [binary, "-c", str(self.conf)],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(self.port, START_TIMEOUT_S, "Mosquitto")
        except ServiceError:
            self._process.kill()
            _, err = self._process.communicate()
            raise ServiceError(f"Mosquitto did not start: {err.decode(errors='replace')}") from None
        log.info("private Mosquitto at %s (data in %s)", self.url, self.data)
        return self.url

    def stop(self) -> None:
        if self._process is None:
            return
        # SIGTERM: Mosquitto writes its persistence file (queued messages) before exiting.
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def reload(self) -> None:
        """SIGHUP: the broker reads its password file and ACL again."""
        if self._process is not None:
            self._copies()
            self._process.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL, for tests of a broker crash."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def _stop_leftover(self) -> None:
        """A broker left running by a killed daemon still holds our files: stop it."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"mosquitto" in cmdline and str(self.conf).encode() in cmdline:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.05)
