"""`energy-ingest run`: the daemon's parts, put together in one `AsyncExitStack`.

Read `serve` top-down: the order of its `enter` calls is the order a reading travels
(broker → subscriber → intake → writer → PostgreSQL, beside HTTP's own intake), and the
stack's exit, their reverse, is the shutdown order that keeps "nothing lost":

1. no new MQTT readings (the subscriber pauses), the shutdown's deadline starts;
2. HTTP takes no new connections and answers what it has (HTTP_DRAIN_S at most);
3. the census and housekeeping stop; the writer commits what it holds, within the deadline, and its
   acknowledgements go out (PUBACKs, HTTP answers);
4. HTTP ends; the subscriber lets the last PUBACKs out and disconnects, keeping its session;
5. the loop watch, the probes and the pools close; private services stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any, Protocol

from api.app import create_app
from api.runtime import BrokerStatus, Runtime
from api.server import HttpServer
from broker.intake import MqttIntake
from broker.subscriber import Intake, MqttSubscriber, SessionSettings
from broker.tls import client_context
from broker.topics import subscriptions
from daemon.database import Probes, database_probes, prepare_database
from daemon.pools import POOL_CLOSE_S, Pools, database_pools
from daemon.services import private_services
from ingest.census import Census
from ingest.config import MqttEndpoint, Settings
from ingest.flushing import PoolFlush
from ingest.housekeeping import Housekeeping
from ingest.lifecycle import Deadline, cancel, first_to_end
from ingest.loopwatch import LoopWatch
from ingest.metrics import Metrics
from ingest.readings import Limits
from ingest.writer import Writer

log = logging.getLogger(__name__)


class SubscriberFactory(Protocol):
    """Makes the MQTT client (tests and other clients plug in here, a subclass each)."""

    def __call__(
        self, settings: SessionSettings, *, intake: Intake, metrics: Metrics
    ) -> MqttSubscriber: ...


async def serve(
    settings: Settings, *, subscriber_factory: SubscriberFactory = MqttSubscriber
) -> bool:
    """Everything in one process until SIGINT/SIGTERM. False when a part (writer, MQTT,
    HTTP) stopped by itself: the process should exit non-zero."""
    stop = _stop_on_signals()
    async with AsyncExitStack() as stack:
        urls = await stack.enter_async_context(private_services(settings))
        if not await _until_stopped(prepare_database(settings, urls.database_url), stop):
            log.info("stopped before the database was ready")
            return True
        pools = await stack.enter_async_context(database_pools(settings, urls.database_url))
        probes = await stack.enter_async_context(database_probes(settings, urls.database_url))
        metrics = Metrics()
        metrics.watch_replica(probes.replica_status)
        await stack.enter_async_context(LoopWatch(metrics))
        # (What the shutdown leaves after the writer's commit: the PUBACKs, closing the pools.)
        deadline = Deadline(max(0.0, settings.shutdown_timeout_s - POOL_CLOSE_S))

        # A reading's path: the subscriber hands each delivery to the intake, which
        # validates it and submits it to the writer; the writer commits it in a batch
        # (PoolFlush) and settles it; the intake acknowledges it then.
        limits = _limits(settings)
        writer = Writer(
            PoolFlush(pools.write),
            flush_max_readings=settings.flush_max_readings,
            flush_interval_s=settings.flush_interval_s,
            buffer_max_readings=settings.buffer_max_readings,
            flush_concurrency=settings.flush_concurrency,
            metrics=metrics,
        )
        intake = MqttIntake(
            writer=writer, limits=limits, payload_max_bytes=settings.rejection_payload_max_bytes
        )
        endpoint = MqttEndpoint(urls.mqtt_url)
        subscriber = subscriber_factory(
            session_settings(settings, endpoint), intake=intake, metrics=metrics
        )
        writer.room_listeners.append(subscriber.resume)  # (it pauses itself when full)
        housekeeping = Housekeeping(settings, pools.control, writer, metrics)
        http = _http(settings, writer, limits, pools, probes, subscriber, housekeeping, metrics)

        # Entered in this order, left in the reverse: the shutdown order above.
        await stack.enter_async_context(subscriber.within(deadline))
        await stack.enter_async_context(http.within(deadline))
        await stack.enter_async_context(writer.within(deadline))
        await stack.enter_async_context(housekeeping)
        await stack.enter_async_context(Census(settings, pools.read, metrics))
        stack.push_async_callback(http.drain, deadline)
        stack.callback(subscriber.pause)
        stack.callback(deadline.start)

        _say_serving(settings, endpoint)
        crashed = await first_to_end([writer, subscriber, http], stop)
        for part in crashed:
            error = part.task.exception() if part.task is not None else None
            log.error("%s stopped: %s", part.name, error if error else "it returned")
    log.info("stopped")
    return not crashed


def _http(
    settings: Settings,
    writer: Writer,
    limits: Limits,
    pools: Pools,
    probes: Probes,
    subscriber: MqttSubscriber,
    housekeeping: Housekeeping,
    metrics: Metrics,
) -> HttpServer:
    """HTTP's intake (into the same writer) and the operators' reads, on the read pool."""
    runtime = Runtime(
        settings=settings,
        writer=writer,
        limits=limits,
        read_pool=pools.read,
        control_pool=pools.control,
        broker_status=lambda: BrokerStatus(subscriber.ready, subscriber.detail),
        upkeep_status=lambda: housekeeping.status,
        database_status=lambda: probes.primary.status,
        replica_status=probes.replica_status,
    )
    return HttpServer(create_app(runtime), settings, metrics)


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run `work` unless SIGTERM/SIGINT comes first (waiting for PostgreSQL at start, say);
    True if it finished."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    await cancel(stopped)
    if not task.done():
        await cancel(task)
        return False
    task.result()
    return True


def _limits(settings: Settings) -> Limits:
    return Limits(
        retention=timedelta(days=settings.retention_days),
        future_skew=timedelta(seconds=settings.future_skew_s),
        max_kwh=settings.max_kwh_per_reading,
        max_items=settings.max_batch_readings,
    )


def session_settings(settings: Settings, endpoint: MqttEndpoint) -> SessionSettings:
    tls = None
    if endpoint.tls:
        tls = client_context(
            ca_file=settings.mqtt_ca_file,
            cert_file=settings.mqtt_client_cert_file,
            key_file=settings.mqtt_client_key_file,
        )
    return SessionSettings(
        host=endpoint.host,
        port=endpoint.port,
        tls=tls,
        username=endpoint.username,
        password=endpoint.password,
        client_id=settings.mqtt_client_id,
        topics=tuple(subscriptions(settings.mqtt_shared_group)),
        qos=settings.mqtt_qos,
        session_expiry_s=settings.mqtt_session_expiry_s,
        keepalive_s=settings.mqtt_keepalive_s,
        receive_maximum=settings.mqtt_receive_maximum,
        max_packet_bytes=settings.mqtt_max_packet_bytes,
    )


def _say_serving(settings: Settings, endpoint: MqttEndpoint) -> None:
    if not settings.api_keys:
        log.warning(
            "HTTP API is OPEN: no API keys configured; anyone who can reach port %d "
            "may ingest and read. Set INGEST_API_KEYS and OPERATOR_API_KEYS.",
            settings.http_port,
        )
    log.info(
        "serving HTTP on http://%s:%d, MQTT from %s as %r",
        settings.http_host,
        settings.http_port,
        endpoint,
        settings.mqtt_client_id,
    )
