"""What every benchmark needs: private services, the daemon as a measured child process,
its metrics, and results written as JSON (`bench/results/`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from daemon.services import EmbeddedMosquitto, EmbeddedPostgres, free_port
from db.partitions import prepare_schema
from db.tables import REJECTIONS, SESSIONS, STREAMS

RESULTS = Path("bench/results")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Services:
    pg: EmbeddedPostgres
    broker: EmbeddedMosquitto

    @property
    def dsn(self) -> str:
        return self.pg.dsn


@contextlib.contextmanager
def scratch(prefix: str = "energy-ingest-bench-") -> Iterator[Path]:
    """A folder for private services, removed after them (a 30-day history is gigabytes)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def private_postgres(root: Path) -> Iterator[EmbeddedPostgres]:
    """A private PostgreSQL under `root` (durable: fsync on, as in production)."""
    pg = EmbeddedPostgres(root / "postgres", port=0)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


@contextlib.contextmanager
def services() -> Iterator[Services]:
    """A private PostgreSQL and Mosquitto, the database prepared."""
    with scratch() as root, private_postgres(root) as pg:
        broker = EmbeddedMosquitto(root / "mosquitto", port=0)
        broker.start()
        try:
            asyncio.run(prepare(pg.dsn))
            yield Services(pg, broker)
        finally:
            broker.stop()


async def prepare(dsn: str, *, retention_days: int = 40) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await prepare_schema(conn, schema="public", retention_days=retention_days, lookahead_days=3)
    finally:
        await conn.close()


async def reset(dsn: str) -> None:
    """Empty every table, so that each run starts from the same state."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            name for t in STREAMS.values() for name in (t.history, t.latest, t.hourly, t.deltas)
        ]
        await conn.execute(f"TRUNCATE {', '.join([*tables, SESSIONS, REJECTIONS])}")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


class Daemon:
    """`energy-ingest run` as a child process, with its CPU time and peak memory."""

    def __init__(self, svc: Services, *, tree: Path | None = None, **settings: Any) -> None:
        # `tree`: another checkout of the project whose daemon runs instead of this one's (a
        # build before a change, measured beside it).
        self.tree = tree
        self.port = free_port()
        self.env = {
            **os.environ,
            "DATABASE_URL": svc.dsn,
            "MQTT_URL": svc.broker.url,
            "HTTP_PORT": str(self.port),
            "MQTT_CLIENT_ID": "bench-daemon",
            "LOG_LEVEL": "WARNING",
            "RETENTION_DAYS": "40",
        }
        self.env.update({k.upper(): str(v) for k, v in settings.items()})
        if tree is not None:
            self.env["PYTHONPATH"] = str(tree)
        self.process: subprocess.Popen[bytes] | None = None
        self.profiler: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, *, until_ready: bool = True) -> float:
        """Start and wait until ready (or only until connected to the broker); returns that
        time. A drain is timed from the connection: a stored backlog comes before the SUBACK
        that makes the daemon ready, and timing from readiness would leave its start out.
        """
        # BENCH_DAEMON_COMMAND runs another build of the daemon under the same benchmark
        # (scripts/aiomqtt3/measure.sh: the daemon with its MQTT session on aiomqtt 3).
        command = shlex.split(os.environ.get("BENCH_DAEMON_COMMAND", "")) or [
            sys.executable,
            "-m",
            "daemon",
            "run",
        ]
        self.process = subprocess.Popen(command, env=self.env, cwd=self.tree)
        profile = os.environ.get("BENCH_PROFILE")  # a file for py-spy's collapsed stacks
        if profile:
            beside = Path(sys.executable).parent / "py-spy"  # in the venv, or else on PATH
            self.profiler = subprocess.Popen(
                [
                    str(beside) if beside.exists() else "py-spy",
                    "record",
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--nonblocking",
                    "-o",
                    profile,
                    "--pid",
                    str(self.process.pid),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                health = httpx.get(self.url + "/health", timeout=1)
                broker = health.json()["broker"]
                if health.status_code == 200 or (
                    not until_ready and broker["detail"].startswith("connected")
                ):
                    return time.time()
            time.sleep(0.005)
        raise RuntimeError("the daemon did not become ready")

    def cpu_s(self) -> float:
        assert self.process is not None
        return process_cpu_s(self.process.pid)

    def peak_rss_mb(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.send_signal(signal.SIGINT)
            self.profiler.wait(timeout=30)
            self.profiler = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_s(root_pid: int) -> float:
    """CPU seconds of a process and of its children (PostgreSQL: the postmaster and every
    backend and worker): those running now, and those that ended (which the root has reaped:
    its own cutime and cstime), so that the sum only grows."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            pid = int(entry.name)
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if pid == root_pid:
                total += sum(int(v) for v in fields[11:15]) / CLOCK_TICKS
            elif int(fields[1]) == root_pid:
                total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def postgres_cpu_s(pg: EmbeddedPostgres) -> float:
    """CPU seconds of the private PostgreSQL: its postmaster and every backend."""
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    return tree_cpu_s(postmaster)


class BoxCpu:
    """The whole machine's CPU over a stretch of time, from /proc/stat: how many cores were
    busy (daemon, PostgreSQL, broker, load generator together) and how much the hypervisor
    took away (steal), which is what makes a shared machine noisy."""

    def __init__(self) -> None:
        self._start = (time.monotonic(), self._jiffies())

    @staticmethod
    def _jiffies() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        steal = fields[7] if len(fields) > 7 else 0
        return user + nice + system + irq + softirq, steal

    def measure(self) -> dict[str, float]:
        started, (busy0, steal0) = self._start
        busy1, steal1 = self._jiffies()
        seconds = (time.monotonic() - started) * CLOCK_TICKS
        return {
            "box_busy_cores": round((busy1 - busy0) / seconds, 2),
            "box_steal_cores": round((steal1 - steal0) / seconds, 2),
        }


def parse_metrics(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def accepted(metrics: dict[str, float]) -> float:
    return sum(
        v
        for k, v in metrics.items()
        if k.startswith('energy_ingest_readings_total{outcome="accepted"')
    )


def histogram_quantile(
    metrics: dict[str, float], name: str, q: float, label: str = ""
) -> float | None:
    """As PromQL's histogram_quantile: linear inside the bucket that holds the quantile."""
    buckets = []
    for key, value in metrics.items():
        if key.startswith(name + "_bucket{") and label in key:
            le = key.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


@dataclass
class Result:
    scenario: str
    parameters: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    def save(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        keys = sorted(
            {k for run in self.runs for k, v in run.items() if isinstance(v, int | float)}
        )
        body = {
            "scenario": self.scenario,
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "command": " ".join(["energy-ingest", *sys.argv[1:]]),
            "parameters": self.parameters,
            "medians": {k: self.median(k) for k in keys},
            "runs": self.runs,
        }
        path = RESULTS / f"{self.scenario}-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
        path.write_text(json.dumps(body, indent=2))
        return path

    def summary(self, keys: list[str], *, group_by: str | None = None) -> str:
        """Medians of `keys`; per value of `group_by` when runs differ by it (offered rate,
        history length), since a median across those would mean nothing."""
        groups: list[Any] = sorted({run[group_by] for run in self.runs}) if group_by else [None]
        lines = []
        for group in groups:
            runs = [r for r in self.runs if group_by is None or r.get(group_by) == group]
            title = f" ({group_by} {group})" if group_by else ""
            lines.append(f"{self.scenario}{title}: medians of {len(runs)} runs")
            for key in keys:
                values = [r[key] for r in runs if r.get(key) is not None]
                value = statistics.median(values) if values else None
                lines.append(f"  {key:32} {value:,.3f}" if value is not None else f"  {key:32} -")
        return "\n".join(lines)
