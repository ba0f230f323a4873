"""The daemon's lifecycle: services, migrations, the writer, the MQTT subscriber and HTTP.

Shutdown order matters for "nothing lost": stop reading MQTT and stop HTTP first, then let
the writer flush what it holds (acks go out after its commit), then disconnect the broker
(keeping the session), then stop whatever private services we started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import uvicorn

from api.app import create_app
from api.protocol import ConnectionLimits, with_limits
from broker.intake import MqttIntake
from broker.subscriber import Delivery, MqttSubscriber, SessionSettings
from broker.tls import client_context
from broker.topics import subscriptions
from daemon.config import MqttEndpoint, Settings
from daemon.embedded import EmbeddedMosquitto, EmbeddedPostgres
from daemon.flushing import PoolFlush
from daemon.loopwatch import LoopWatch
from daemon.metrics import Metrics
from daemon.pools import Pools, database_pools
from daemon.probe import DatabaseProbe
from daemon.readings import Limits
from daemon.runtime import BrokerStatus, Runtime
from daemon.upkeep import Housekeeping, run_upkeep
from daemon.writer import Submission, Writer
from db.errors import DATABASE_ERRORS, setup_problem
from db.migrate import migrate
from db.pool import TRANSACTION, check_schema, connect

log = logging.getLogger(__name__)

HTTP_DRAIN_S = 2.0
PUBACK_GRACE_S = 0.05
POOL_CLOSE_S = 1.0  # (daemon.pools closes each pool within this)
FDS_KEPT = 256  # file descriptors not given to HTTP connections
DB_WAIT_LOG_EVERY_S = 10.0
# (A hint only, for a message PostgreSQL itself never sends: a pooler refusing `search_path`.)
POOLER_HINT = " (behind a pooler in transaction mode? set DB_POOLER=transaction)"


@dataclass(frozen=True, slots=True)
class Endpoints:
    database_url: str
    mqtt_url: str


@contextlib.asynccontextmanager
async def endpoints(settings: Settings, *, broker: bool = True) -> AsyncIterator[Endpoints]:
    """The configured URLs, or private services started under VAR_DIR (stopped on exit)."""
    with contextlib.ExitStack() as stack:
        database_url = settings.database_url
        if database_url is None:
            pg = EmbeddedPostgres(settings.var_dir / "postgres", port=settings.embedded_pg_port)
            database_url = await asyncio.to_thread(pg.start)
            stack.callback(pg.stop)
        mqtt_url = settings.mqtt_url or ""
        if broker and settings.mqtt_url is None:
            mosquitto = EmbeddedMosquitto(
                settings.var_dir / "mosquitto", port=settings.embedded_mqtt_port
            )
            mqtt_url = await asyncio.to_thread(mosquitto.start)
            stack.callback(mosquitto.stop)
        yield Endpoints(database_url, mqtt_url)


async def prepare_database(settings: Settings, database_url: str) -> None:
    """Apply migrations and create partitions; waits (logging) while PostgreSQL is down.
    Raises DatabaseSetupError for what waiting cannot mend (a password, a database that
    does not exist, a missing permission)."""
    waited = 0.0
    while True:
        try:
            conn = await connect(database_url, schema=settings.db_schema, pooler=settings.db_pooler)
            break
        except DATABASE_ERRORS as error:
            problem = setup_problem(error)
            if problem is not None:
                raise problem from error
            if waited % DB_WAIT_LOG_EVERY_S < 1:
                hint = POOLER_HINT if "startup parameter" in str(error) else ""
                log.warning("waiting for PostgreSQL at %s: %s%s", _safe(database_url), error, hint)
            await asyncio.sleep(1)
            waited += 1
    try:
        await migrate(conn, schema=settings.db_schema)
        if settings.db_pooler == TRANSACTION:
            await check_schema(conn, settings.db_schema)
        await run_upkeep(conn, settings)
    except asyncpg.PostgresError as error:
        problem = setup_problem(error)
        if problem is not None:
            raise problem from error
        raise
    finally:
        await conn.close()


def _safe(url: str) -> str:
    return url.split("@")[-1]


class _QuietServer(uvicorn.Server):
    """uvicorn, minus its own signal handling: the daemon decides when HTTP stops."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(settings: Settings) -> bool:
    """`energy-ingest run`: everything in one process until SIGINT/SIGTERM. False when a
    part of it (writer, MQTT, HTTP) stopped by itself: the process should exit non-zero."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with endpoints(settings) as urls:
        if not await _until_stopped(prepare_database(settings, urls.database_url), stop):
            log.info("stopped before the database was ready")
            return True
        async with AsyncExitStack() as stack:
            pools = await stack.enter_async_context(database_pools(settings, urls.database_url))
            probes = await stack.enter_async_context(_probes(settings, urls.database_url))
            return await _run_daemon(settings, urls, pools, probes, stop)
    raise AssertionError("unreachable")  # (mypy: async with may swallow exceptions)


@dataclass(frozen=True, slots=True)
class Probes:
    primary: DatabaseProbe
    replica: DatabaseProbe | None


@contextlib.asynccontextmanager
async def _probes(settings: Settings, database_url: str) -> AsyncIterator[Probes]:
    """The primary's health probe, and the replica's when reads go to one."""
    schema, pooler = settings.db_schema, settings.db_pooler
    async with AsyncExitStack() as stack:
        primary = await stack.enter_async_context(
            DatabaseProbe(database_url, schema=schema, pooler=pooler)
        )
        replica = None
        if settings.database_read_url:
            replica = await stack.enter_async_context(
                DatabaseProbe(
                    settings.database_read_url, schema=schema, pooler=pooler, replica=True
                )
            )
        yield Probes(primary, replica)


async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run `work` unless SIGTERM/SIGINT comes first (waiting for PostgreSQL at start, say);
    True if it finished."""
    task = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    task.result()
    return True


def connection_limits(settings: Settings) -> ConnectionLimits:
    """HTTP_MAX_CONNECTIONS, within the file descriptors this process may open (raised to
    the hard limit first; some are kept for PostgreSQL, the broker and the log)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    cap = min(settings.http_max_connections, max(64, soft - FDS_KEPT))
    if cap < settings.http_max_connections:
        log.warning("HTTP: at most %d connections (open files limit %d)", cap, soft)
    return ConnectionLimits(
        header_timeout_s=settings.http_header_timeout_s,
        body_timeout_s=settings.http_body_timeout_s,
        max_connections=cap,
        max_request_line_bytes=settings.http_max_request_line_bytes,
        max_header_bytes=settings.http_max_header_bytes,
        max_headers=settings.http_max_headers,
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


async def _run_daemon(
    settings: Settings, urls: Endpoints, pools: Pools, probes: Probes, stop: asyncio.Event
) -> bool:
    limits = Limits(
        retention=timedelta(days=settings.retention_days),
        future_skew=timedelta(seconds=settings.future_skew_s),
        max_kwh=settings.max_kwh_per_reading,
    )
    metrics = Metrics()
    writer = Writer(
        PoolFlush(pools.write),
        flush_max_readings=settings.flush_max_readings,
        flush_interval_s=settings.flush_interval_s,
        buffer_max_readings=settings.buffer_max_readings,
        flush_concurrency=settings.flush_concurrency,
        metrics=metrics,
    )
    endpoint = MqttEndpoint(urls.mqtt_url)

    def forget_unacked(generation: int) -> None:
        # The broker redelivers every unacked QoS 1 message of that connection: drop the
        # copies still waiting here rather than hold them twice.
        def stale(s: Submission) -> bool:
            return isinstance(s.tag, int) and s.tag <= generation

        dropped = writer.drop_pending(stale)
        if dropped:
            log.info("dropped %d unflushed MQTT messages; the broker redelivers them", dropped)

    def on_delivery(delivery: Delivery) -> None:
        intake(delivery)
        if writer.full:
            subscriber.pause()

    subscriber = MqttSubscriber(
        session_settings(settings, endpoint),
        on_delivery=on_delivery,
        on_connection_lost=forget_unacked,
        metrics=metrics,
    )
    intake = MqttIntake(
        writer=writer,
        ack=subscriber.ack,
        limits=limits,
        payload_max_bytes=settings.rejection_payload_max_bytes,
    )
    writer.room_listeners.append(subscriber.resume)
    if not settings.api_keys:
        log.warning(
            "HTTP API is OPEN: no API keys configured; anyone who can reach port %d "
            "may ingest and read. Set INGEST_API_KEYS and OPERATOR_API_KEYS.",
            settings.http_port,
        )
    housekeeping = Housekeeping(settings, pools.control, writer, metrics)
    replica = probes.replica
    runtime = Runtime(
        settings=settings,
        writer=writer,
        limits=limits,
        read_pool=pools.read,
        control_pool=pools.control,
        broker_status=lambda: BrokerStatus(subscriber.ready, subscriber.detail),
        upkeep_status=lambda: housekeeping.status,
        database_status=lambda: probes.primary.status,
        replica_status=lambda: replica.status if replica is not None else None,
    )
    http_limits = connection_limits(settings)
    metrics.watch_http(http_limits)
    server = _QuietServer(
        uvicorn.Config(
            create_app(runtime),
            host=settings.http_host,
            port=settings.http_port,
            log_level="warning",
            lifespan="off",
            # Neither is used (no access log; client addresses are never looked at), and
            # both cost CPU on every request.
            access_log=False,
            proxy_headers=False,
            http=with_limits(http_limits),
            timeout_keep_alive=settings.http_keepalive_s,
        )
    )
    async with LoopWatch(metrics):
        return await _serve_until_stopped(
            settings, endpoint, server, subscriber, writer, housekeeping, stop
        )


async def _serve_until_stopped(
    settings: Settings,
    endpoint: MqttEndpoint,
    server: uvicorn.Server,
    subscriber: MqttSubscriber,
    writer: Writer,
    housekeeping: Housekeeping,
    stop: asyncio.Event,
) -> bool:
    writer_task = asyncio.create_task(writer.run(), name="writer")
    mqtt_task = asyncio.create_task(subscriber.run(), name="mqtt")
    http_task = asyncio.create_task(server.serve(), name="http")
    upkeep_task = asyncio.create_task(housekeeping.run(), name="housekeeping")
    log.info(
        "serving HTTP on http://%s:%d, MQTT from %s as %r",
        settings.http_host,
        settings.http_port,
        endpoint,
        settings.mqtt_client_id,
    )
    stop_task = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait(
        {stop_task, writer_task, mqtt_task, http_task}, return_when=asyncio.FIRST_COMPLETED
    )
    crashed = [task for task in done if task is not stop_task]
    for task in crashed:
        error = task.exception()
        log.error("%s stopped: %s", task.get_name(), error if error else "it returned")
    await _shut_down(settings, server, subscriber, writer, http_task, writer_task)
    for task in (mqtt_task, upkeep_task, writer_task, http_task, stop_task):
        task.cancel()
    await asyncio.gather(
        mqtt_task, upkeep_task, writer_task, http_task, stop_task, return_exceptions=True
    )
    log.info("stopped")
    return not crashed


async def _shut_down(
    settings: Settings,
    server: uvicorn.Server,
    subscriber: MqttSubscriber,
    writer: Writer,
    http_task: asyncio.Task[None],
    writer_task: asyncio.Task[None],
) -> None:
    """Within SHUTDOWN_TIMEOUT_S (below the stop grace period of a container, after which
    it is killed): no new readings, HTTP answers what it has, the writer commits what it
    holds and its PUBACKs leave; the caller then disconnects from the broker, keeping the
    session. What is still unflushed at the deadline is not acknowledged: the broker delivers
    it again, HTTP callers were answered 503."""
    deadline = time.monotonic() + settings.shutdown_timeout_s
    log.info("stopping: no new readings; flushing %d buffered", writer.depth)
    subscriber.pause()
    server.should_exit = True
    await asyncio.wait({http_task}, timeout=min(HTTP_DRAIN_S, settings.shutdown_timeout_s / 3))
    writer.stop()
    # (What is left after the flush: the PUBACKs, then closing the pool, POOL_CLOSE_S.)
    flush_s = max(0.0, deadline - time.monotonic() - PUBACK_GRACE_S - POOL_CLOSE_S)
    await asyncio.wait({writer_task}, timeout=flush_s)
    if not writer_task.done():
        log.warning(
            "shutdown deadline (SHUTDOWN_TIMEOUT_S=%s): %d readings not flushed, not "
            "acknowledged (the broker delivers them again)",
            settings.shutdown_timeout_s,
            writer.depth,
        )
    await asyncio.sleep(PUBACK_GRACE_S)  # let queued PUBACKs reach the socket
