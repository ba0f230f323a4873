"""Real services for the tests: the private PostgreSQL and Mosquitto of `make run`, and the
daemon itself as a child process (so it can be killed like a real one)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from daemon.services import (
    EmbeddedMosquitto,
    EmbeddedPostgres,
    free_port,
    owned_folder,
    run_as,
    wait_for_port,
)

REPO = Path(__file__).resolve().parent.parent


def service_root(name: str) -> Path:
    # The services may run as their own system users: they must be able to reach the folder.
    root = Path(tempfile.mkdtemp(prefix=f"energy-ingest-{name}-"))
    root.chmod(0o755)
    return root


@contextmanager
def running_postgres() -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(service_root("pg") / "postgres", port=0, fsync=False)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


@contextmanager
def running_mosquitto() -> Iterator[EmbeddedMosquitto]:
    broker = EmbeddedMosquitto(service_root("mqtt") / "mosquitto", port=0)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def database_url(pg: EmbeddedPostgres, name: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{pg.port}/{name}"


class DaemonProcess:
    """`energy-ingest run` in a child process, pointed at the test services."""

    def __init__(self, *, database_url: str, mqtt_url: str, **settings: Any) -> None:
        self.http_port = free_port()
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "MQTT_URL": mqtt_url,
            "HTTP_PORT": str(self.http_port),
            "MQTT_CLIENT_ID": f"test-daemon-{uuid.uuid4().hex[:8]}",
            "FLUSH_INTERVAL_MS": "20",
            "LOG_LEVEL": "INFO",
        }
        self.env.update({key.upper(): str(value) for key, value in settings.items()})
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="energy-ingest-daemon-", suffix=".log")[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, *, wait: bool = True) -> DaemonProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run"],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.log()}")
            try:
                response = httpx.get(self.base_url + "/health", timeout=2)
                last = response.json()
                if response.status_code == 200:
                    return dict(last)
            except httpx.HTTPError as error:
                last = error
            time.sleep(0.1)
        raise AssertionError(f"daemon not healthy: {last}\n{self.log()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"daemon did not stop on SIGTERM:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(self.base_url + path, params=params, timeout=10)


class Publisher:
    """A device (or gateway) publishing over MQTT 5 with QoS 1, waiting for the broker's acks."""

    def __init__(self, port: int, *, client_id: str | None = None) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.max_inflight_messages_set(500)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)

    def publish_all(self, messages: Sequence[tuple[str, bytes | str]], qos: int = 1) -> None:
        infos = [self.publish(topic, payload, qos) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate: Any, timeout_s: float = 20.0, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout_s} s (last value {value!r})")
        time.sleep(interval_s)


class PgBouncer:
    """Debian's PgBouncer in transaction pooling mode (what managed poolers run), in front of
    a private PostgreSQL, with TLS on both sides."""

    def __init__(
        self, root: Path, *, pg_port: int, database: str, cert_file: Path, key_file: Path
    ) -> None:
        self.owner = run_as("postgres")  # PgBouncer refuses to run as root
        self.root = owned_folder(root, self.owner)
        self.port = free_port()
        for source, name in ((cert_file, "server.crt"), (key_file, "server.key")):
            copy = self.root / name
            copy.write_bytes(source.read_bytes())
            copy.chmod(0o600)
            if self.owner.is_other:
                os.chown(copy, self.owner.uid, self.owner.gid)
        (self.root / "users.txt").write_text('"postgres" ""\n')
        self.conf = self.root / "pgbouncer.ini"
        self.conf.write_text(
            f"""[databases]
{database} = host=127.0.0.1 port={pg_port} dbname={database}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.root}/users.txt
pool_mode = transaction
default_pool_size = 8
max_client_conn = 200
server_tls_sslmode = require
client_tls_sslmode = require
client_tls_cert_file = {self.root}/server.crt
client_tls_key_file = {self.root}/server.key
logfile = {self.root}/pgbouncer.log
pidfile = {self.root}/pgbouncer.pid
"""
        )
        for path in (self.conf, self.root / "users.txt"):
            if self.owner.is_other:
                os.chown(path, self.owner.uid, self.owner.gid)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        self.process = subprocess.Popen(
            [binary, str(self.conf)],
            user=self.owner.uid if self.owner.is_other else None,
            group=self.owner.gid if self.owner.is_other else None,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for_port(self.port, 20, "PgBouncer")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None
