"""What the private services share: the unprivileged users they run as, folders those users
own, free ports, and running a program as them.

PostgreSQL refuses to run as root, so when we are root both services run as their Debian
system users (`postgres`, `mosquitto`), owning their folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pwd
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0


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


def run_as_owner(
    args: list[str], owner: RunAs, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    user = owner.uid if owner.is_other else None
    group = owner.gid if owner.is_other else None
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        args, user=user, group=group, text=True, capture_output=True, **kwargs
    )
