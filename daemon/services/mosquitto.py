"""A private Mosquitto for `make run` and the tests (when MQTT_URL is unset): the shipped
mosquitto.conf's delivery settings, a loopback listener, its own folder (`var/mosquitto` by
default); anonymous (demo mode), or with a password file and ACL like a deployment."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.services.processes import (
    START_TIMEOUT_S,
    ServiceError,
    choose_port,
    free_port,
    owned_folder,
    run_as,
    wait_for_port,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
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
