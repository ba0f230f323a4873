"""Prometheus instruments of one daemon (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LAG_BUCKETS_S = (
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    3600,
    86400,
)
FLUSH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000, 20000)
FLUSH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.readings = Counter(
            "energy_ingest_readings",
            "Readings by outcome (accepted, duplicate, rejected), stream and transport",
            ["outcome", "stream", "transport"],
            registry=r,
        )
        self.buffer_depth = Gauge(
            "energy_ingest_buffer_depth",
            "Readings held in memory, waiting or being written",
            registry=r,
        )
        self.flush_size = Histogram(
            "energy_ingest_flush_readings",
            "Readings per flush transaction",
            buckets=FLUSH_SIZE_BUCKETS,
            registry=r,
        )
        self.flush_seconds = Histogram(
            "energy_ingest_flush_seconds",
            "Duration of a flush transaction",
            buckets=FLUSH_SECONDS_BUCKETS,
            registry=r,
        )
        self.flush_failures = Counter(
            "energy_ingest_flush_failures",
            "Flush transactions that failed and were retried",
            registry=r,
        )
        self.lag_seconds = Histogram(
            "energy_ingest_lag_seconds",
            "Time to commit, from the reading's own timestamp (since=reading) or from its "
            "arrival at the daemon (since=receive)",
            ["since"],
            buckets=LAG_BUCKETS_S,
            registry=r,
        )
        self.last_commit = Gauge(
            "energy_ingest_last_commit_unixtime",
            "When the last flush transaction committed",
            registry=r,
        )
        self.database_up = Gauge(
            "energy_ingest_database_up", "1 when the last flush reached PostgreSQL", registry=r
        )
        self.broker_connected = Gauge(
            "energy_ingest_broker_connected", "1 while connected to the MQTT broker", registry=r
        )
        self.database_up.set(1)

    def rejected(self, stream: str, transport: str, count: int = 1) -> None:
        self.readings.labels("rejected", stream, transport).inc(count)
