"""Device and daemon credentials for Mosquitto's password file.

Lines are `user:$7$iterations$salt$hash`, the PBKDF2-SHA512 format of Mosquitto 2's own
`mosquitto_passwd`, so no broker tool is needed to provision. The ACL
(`deploy/mosquitto/acl`) lets a user publish only to the topics that carry its own id.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from pathlib import Path

ITERATIONS = 101  # Mosquitto's own default for $7$ hashes
SALT_BYTES = 12
_USERNAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ProvisionError(ValueError):
    pass


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    encode = base64.b64encode
    return f"$7${ITERATIONS}${encode(salt).decode()}${encode(digest).decode()}"


def provision(password_file: Path, username: str, password: str | None = None) -> str:
    """Add or replace `username` in the password file; returns the password."""
    if not _USERNAME.match(username):
        # ':' separates user and hash in the file, and '+', '#', '/' would let %u in the
        # ACL patterns reach other topics.
        raise ProvisionError(f"{username!r}: a provisioned id must match {_USERNAME.pattern}")
    password = password or secrets.token_urlsafe(18)
    lines = password_file.read_text().splitlines() if password_file.exists() else []
    kept = [line for line in lines if line.split(":", 1)[0] != username]
    kept.append(f"{username}:{hash_password(password)}")
    password_file.parent.mkdir(parents=True, exist_ok=True)
    temporary = password_file.with_suffix(".tmp")
    temporary.write_text("\n".join(kept) + "\n")
    temporary.chmod(0o640 if os.geteuid() != 0 else 0o644)
    temporary.replace(password_file)
    return password
