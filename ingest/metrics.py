"""Prometheus instruments of one daemon (its own registry, so tests can run several)."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from db.probe import DatabaseStatus

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
LOOP_LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class BulkHistogram(Collector):
    """A labelled histogram that takes a whole flush's observations in one call.

    prometheus_client's Histogram takes a lock per `observe`; at one observation per MQTT
    message that cost as much as validating the message (see BENCHMARKS.md). Exposed exactly
    as a Histogram is (`_bucket{le=...}`, `_sum`, `_count`), and only ever touched from the
    event loop, so it needs no lock.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._bounds = tuple(float(b) for b in buckets)
        self._series: dict[str, tuple[list[int], list[float]]] = {}
        registry.register(self)

    def observe_many(self, label_value: str, values: Iterable[float]) -> None:
        counts, total = self._series.setdefault(label_value, ([0] * (len(self._bounds) + 1), [0.0]))
        bounds = self._bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # a bucket counts values <= its bound
            total[0] += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=[self._label])
        for label_value, (counts, total) in sorted(self._series.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*self._bounds, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([label_value], buckets, total[0])
        yield family


class HttpCounts(Protocol):
    open: set[Any]
    evicted: int
    timed_out: int


class _HttpConnections(Collector):
    def __init__(self, limits: HttpCounts) -> None:
        self._limits = limits

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            "energy_ingest_http_connections", "Open HTTP connections", len(self._limits.open)
        )
        yield CounterMetricFamily(
            "energy_ingest_http_idle_connections_closed",
            "Idle HTTP connections closed to keep within HTTP_MAX_CONNECTIONS",
            self._limits.evicted,
        )
        yield CounterMetricFamily(
            "energy_ingest_http_request_timeouts",
            "HTTP connections closed (408) for sending a request's headers or body too slowly",
            self._limits.timed_out,
        )


class _Replica(Collector):
    """The streaming replica of DATABASE_READ_URL, as its health probe last found it. The
    families are declared without a sample when reads go to the primary."""

    def __init__(self, status: Callable[[], DatabaseStatus | None]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "energy_ingest_replica_up",
            "1 while the streaming replica of DATABASE_READ_URL answers its health probe, 0 "
            "while it does not (no sample when reads go to the primary)",
        )
        lag = GaugeMetricFamily(
            "energy_ingest_replica_lag_seconds",
            "How old the newest transaction the replica has replayed is, while it has more "
            "to replay or receives no WAL (0 when caught up); no sample while it does not "
            "answer",
        )
        status = self._status()
        if status is not None:
            up.add_metric([], 1 if status.ok else 0)
            if status.ok and status.lag_s is not None:
                lag.add_metric([], status.lag_s)
        yield up
        yield lag


class RecentRate:
    """Events per second over the last `span_s` whole seconds (the second under way is not
    counted yet): the dashboard's "readings per second now". Prometheus users take the
    rate of the counters instead."""

    def __init__(self, span_s: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self.span_s = span_s
        self._clock = clock
        self._slots: deque[list[int]] = deque()  # [second, events], oldest first

    def add(self, events: int) -> None:
        second = int(self._clock())
        if self._slots and self._slots[-1][0] == second:
            self._slots[-1][1] += events
        else:
            self._slots.append([second, events])
        self._forget(second)

    def per_second(self) -> float:
        now = int(self._clock())
        self._forget(now)
        return sum(n for second, n in self._slots if second < now) / self.span_s

    def _forget(self, now: int) -> None:
        while self._slots and self._slots[0][0] < now - self.span_s:
            self._slots.popleft()


class Metrics:
    """Every metric of the daemon, in one registry (GET /metrics), declared by concept."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.stored_rate = RecentRate()  # new readings committed, per second
        r = self.registry
        self._declare_writes(r)
        self._declare_mqtt(r)
        self._declare_housekeeping(r)
        self._declare_census(r)
        self._declare_process(r)

    def _declare_writes(self, r: CollectorRegistry) -> None:
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
        self.buffer_max = Gauge(
            "energy_ingest_buffer_max_readings",
            "BUFFER_MAX_READINGS: at this depth MQTT stops reading and HTTP answers 503",
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
            "Flush transactions PostgreSQL refused, by whose fault (DataFailure: a reading's; "
            "TransientFailure, PersistentFailure: the database's) and SQLSTATE",
            ["kind", "cause"],
            registry=r,
        )
        self.held_readings = Gauge(
            "energy_ingest_held_readings",
            "Readings the database keeps refusing for a reason of its own (a missing "
            "partition, permissions...): held, not acknowledged, retried",
            registry=r,
        )
        self.lag_seconds = BulkHistogram(
            "energy_ingest_lag_seconds",
            "Time to commit, from the reading's own timestamp (since=reading) or from its "
            "arrival at the daemon (since=receive)",
            "since",
            LAG_BUCKETS_S,
            registry=r,
        )
        self.last_commit = Gauge(
            "energy_ingest_last_commit_unixtime",
            "When the last flush transaction committed",
            registry=r,
        )
        self.database_up = Gauge(
            "energy_ingest_database_up",
            "0 while a flush is retrying because PostgreSQL is away or refuses writes",
            registry=r,
        )

    def _declare_mqtt(self, r: CollectorRegistry) -> None:
        self.broker_connected = Gauge(
            "energy_ingest_broker_connected", "1 while connected to the MQTT broker", registry=r
        )
        self.broker_ready = Gauge(
            "energy_ingest_broker_ready",
            "1 while connected and every subscription is granted at the QoS asked for",
            registry=r,
        )
        self.mqtt_disconnects = Counter(
            "energy_ingest_mqtt_disconnects",
            "Connections to the broker that ended, by reason (the broker's DISCONNECT reason "
            "code, or what the daemon saw)",
            ["reason"],
            registry=r,
        )
        self.mqtt_subscription_refusals = Counter(
            "energy_ingest_mqtt_subscription_refusals",
            "Topic filters the broker refused or granted at a lower QoS, by reason",
            ["reason"],
            registry=r,
        )
        self.mqtt_sessions_lost = Counter(
            "energy_ingest_mqtt_sessions_lost",
            "Reconnects that found no session on the broker where one should have been",
            registry=r,
        )

    def _declare_housekeeping(self, r: CollectorRegistry) -> None:
        self.upkeep_failures = Counter(
            "energy_ingest_partition_upkeep_failures",
            "Partition upkeep runs that failed (partitions not created ahead)",
            registry=r,
        )
        self.upkeep_last_success = Gauge(
            "energy_ingest_partition_upkeep_last_success_unixtime",
            "When partition upkeep last succeeded",
            registry=r,
        )
        self.rejections_dropped = Counter(
            "energy_ingest_rejections_dropped",
            "Rejection records deleted, oldest first, to keep the table within REJECTIONS_MAX_ROWS",
            registry=r,
        )
        self.rejections_unrecorded = Counter(
            "energy_ingest_rejections_unrecorded",
            "Rejection records not written: more than 1,000 waited for the database (it was "
            "away), or PostgreSQL refused the record itself",
            registry=r,
        )

    def _declare_census(self, r: CollectorRegistry) -> None:
        # Counted every CENSUS_INTERVAL_S from the latest-state tables, not per scrape.
        self.devices = Gauge(
            "energy_ingest_devices",
            "Devices with at least one stored reading, by stream",
            ["stream"],
            registry=r,
        )
        self.silent_devices = Gauge(
            "energy_ingest_silent_devices",
            "Devices whose newest reading is older than SILENT_AFTER_S, by stream",
            ["stream"],
            registry=r,
        )
        self.vehicles_below_efficiency = Gauge(
            "energy_ingest_vehicles_below_efficiency",
            "Vehicles whose efficiency over the last ANALYTICS_DEFAULT_WINDOW_H is below "
            "ALERT_EFFICIENCY_THRESHOLD",
            registry=r,
        )
        self.census_last_success = Gauge(
            "energy_ingest_census_last_success_unixtime",
            "When the silent devices and the vehicles below the threshold were last counted",
            registry=r,
        )
        self.archived_partitions = Counter(
            "energy_ingest_archived_partitions",
            "Raw day partitions exported to Parquet under ARCHIVE_DIR, read back, matched and "
            "dropped, by stream",
            ["stream"],
            registry=r,
        )
        self.archive_failures = Counter(
            "energy_ingest_archive_failures",
            "Exports of a day partition to Parquet that failed or did not match (the "
            "partition is kept and tried again)",
            registry=r,
        )

    def _declare_process(self, r: CollectorRegistry) -> None:
        self.rollup_deltas_folded = Counter(
            "energy_ingest_rollup_deltas_folded",
            "Roll-up deltas (a device's hour, as one flush stored it) folded into the hourly "
            "roll-ups",
            registry=r,
        )
        self.rollup_fold_failures = Counter(
            "energy_ingest_rollup_fold_failures",
            "Folds of the deltas into the hourly roll-ups that failed (tried again; analytics "
            "read the deltas meanwhile, so their figures stay whole)",
            registry=r,
        )
        self.internal_errors = Counter(
            "energy_ingest_internal_errors",
            "Errors of the daemon's own code (a bug), by where: flush (held, retried), http "
            "(answered 500), mqtt (the message recorded as a rejection)",
            ["where"],
            registry=r,
        )
        self.mqtt_intake_failures = Counter(
            "energy_ingest_mqtt_intake_failures",
            "MQTT messages that could not be handled (an internal error) and were recorded "
            "as rejections",
            registry=r,
        )
        self.event_loop_lag = Histogram(
            "energy_ingest_event_loop_lag_seconds",
            "How late the event loop ran a timer due now (sampled every 10 ms): the time "
            "every MQTT message, flush and HTTP request waited for its turn",
            buckets=LOOP_LAG_BUCKETS_S,
            registry=r,
        )
        self.event_loop_lag_max = Gauge(
            "energy_ingest_event_loop_lag_max_seconds",
            "The longest event-loop lag seen over the last minute",
            registry=r,
        )
        self.event_loop_held = Counter(
            "energy_ingest_event_loop_lags_over_budget",
            "Event-loop lags over 20 ms, by cause: the loop was running code for most of the "
            "wait (running), or the process had no CPU (waiting for a CPU)",
            ["cause"],
            registry=r,
        )
        self.reads_in_flight = Gauge(
            "energy_ingest_reads_in_flight",
            "Operators' reads holding a read connection now",
            registry=r,
        )
        self.reads_refused = Counter(
            "energy_ingest_reads_refused",
            "Operators' reads answered 503: busy (no turn or connection within "
            "READ_QUEUE_TIMEOUT_S), statement_timeout, database (unreachable or failing)",
            ["reason"],
            registry=r,
        )

    def watch_http(self, limits: HttpCounts) -> None:
        """The HTTP server's connection counts, read when scraped."""
        self.registry.register(_HttpConnections(limits))

    def watch_replica(self, status: Callable[[], DatabaseStatus | None]) -> None:
        """The replica's health and replay lag, read from its probe when scraped."""
        self.registry.register(_Replica(status))

    def rejected(self, stream: str, transport: str, count: int = 1) -> None:
        self.readings.labels("rejected", stream, transport).inc(count)
