"""Broker identities: each device, and each daemon replica, is a user of its own.

`energy-ingest provision ROLE ID` writes two files that Mosquitto reads:

- the **password file**: `user:$7$iterations$salt$hash`, the PBKDF2-SHA512 format of
  Mosquitto 2's own `mosquitto_passwd`, so no broker tool is needed;
- the **ACL**: one block per user. A meter may write only `meters/<its id>/telemetry`, a
  vehicle only `vehicles/<its id>/telemetry`, a daemon may only read telemetry. (Mosquitto's
  `pattern` lines apply to every user, so `pattern write vehicles/%u/telemetry` would let a
  meter write vehicle topics too: the roles are spelled out per user instead.)

With `use_username_as_clientid` (mosquitto.conf) a client's id is its user name, so no
device can take over another client's session, the daemon's least of all.

Both files are written whole (to a temporary file, then renamed) with mode 0600: Mosquitto
reads them after dropping root, so they must belong to its user (`--owner`; an existing
file's owner is kept).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

ITERATIONS = 101  # Mosquitto's own default for $7$ hashes
SALT_BYTES = 12
# A device id (SPEC §2) without ':', which separates user and hash in the password file.
# fullmatch: `$` alone would let a final newline through.
USERNAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
FILE_MODE = 0o600


class Role(StrEnum):
    METER = "meter"
    VEHICLE = "vehicle"
    DAEMON = "daemon"
    PROBE = "probe"  # may log in, and nothing else: the broker's health check


ACL_LINES: dict[Role, tuple[str, ...]] = {
    Role.METER: ("topic write meters/{id}/telemetry",),
    Role.VEHICLE: ("topic write vehicles/{id}/telemetry",),
    Role.DAEMON: ("topic read meters/+/telemetry", "topic read vehicles/+/telemetry"),
    Role.PROBE: (),
}

ACL_HEADER = """\
# Who may do what on the broker (mosquitto.conf: acl_file), one block per user.
# Written by `energy-ingest provision ROLE ID`: a meter writes only its own meter topic, a
# vehicle only its own vehicle topic, a daemon replica only reads telemetry, a probe (the
# broker's health check) only logs in.
# No `pattern` lines: they apply to every user and cannot tell a meter from a vehicle.
"""


class ProvisionError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    password_file: Path
    acl_file: Path
    owner: int | None = None  # uid for both files; None keeps an existing file's owner


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    encode = base64.b64encode
    return f"$7${ITERATIONS}${encode(salt).decode()}${encode(digest).decode()}"


def provision(files: BrokerFiles, role: Role, username: str, password: str | None = None) -> str:
    """Add or replace `username` with `role` in both files; returns its password."""
    if not USERNAME.fullmatch(username):
        raise ProvisionError(
            f"{username!r}: an id to provision must match {USERNAME.pattern} "
            "(a device id without ':', which the password file uses as a separator)"
        )
    if password is not None and ("\n" in password or "\r" in password or not password):
        raise ProvisionError("a password must be one non-empty line")
    blocks = read_acl(files.acl_file)
    existing = blocks.get(username)
    if existing is not None and role_of(username, existing) != role:
        raise ProvisionError(
            f"{username!r} is provisioned as a {role_of(username, existing) or 'user of its own'}"
            f"; one broker user per id: remove its lines from {files.password_file} and "
            f"{files.acl_file} first"
        )
    password = password or secrets.token_urlsafe(18)
    blocks[username] = [line.format(id=username) for line in ACL_LINES[role]]
    users = _read_lines(files.password_file)
    kept = [line for line in users if line.split(":", 1)[0] != username]
    kept.append(f"{username}:{hash_password(password)}")
    _write(files.password_file, "\n".join(kept) + "\n", files.owner)
    _write(files.acl_file, render_acl(blocks), files.owner)
    return password


def read_acl(path: Path) -> dict[str, list[str]]:
    """Each user's topic lines (comments and blank lines are not kept)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in _read_lines(path):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("user "):
            current = blocks.setdefault(line.removeprefix("user ").strip(), [])
        elif current is not None:
            current.append(line)
    return blocks


def role_of(username: str, lines: list[str]) -> Role | None:
    for role, wanted in ACL_LINES.items():
        if sorted(lines) == sorted(line.format(id=username) for line in wanted):
            return role
    return None


def render_acl(blocks: dict[str, list[str]]) -> str:
    parts = [ACL_HEADER]
    for username, lines in blocks.items():
        parts.append("\n".join([f"user {username}", *lines]) + "\n")
    return "\n".join(parts)


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _write(path: Path, text: str, owner: int | None) -> None:
    if owner is None and path.exists():
        owner = path.stat().st_uid
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.chmod(temporary, FILE_MODE)  # (an older temporary file kept its own mode)
    if owner is not None and owner != os.geteuid():
        os.chown(temporary, owner, -1)
    temporary.replace(path)
