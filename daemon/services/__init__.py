"""Private PostgreSQL and Mosquitto instances for `make run` and the tests.

Used when DATABASE_URL / MQTT_URL are not set: each service lives in a folder of its own
(`var/postgres`, `var/mosquitto` by default), listens on loopback only, and is stopped by
whoever started it (`private_services` starts what the configuration leaves unset, and stops
it on exit).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from daemon.services.mosquitto import (
    BrokerAuth,
    BrokerTls,
    EmbeddedMosquitto,
    private_broker_config,
    shipped_mosquitto_conf,
)
from daemon.services.postgres import PG_DATABASE, EmbeddedPostgres, ServerTls
from daemon.services.processes import (
    RunAs,
    ServiceError,
    free_port,
    owned_folder,
    run_as,
    wait_for_port,
)
from ingest.config import Settings

__all__ = [
    "PG_DATABASE",
    "BrokerAuth",
    "BrokerTls",
    "EmbeddedMosquitto",
    "EmbeddedPostgres",
    "Endpoints",
    "RunAs",
    "ServerTls",
    "ServiceError",
    "free_port",
    "owned_folder",
    "private_broker_config",
    "private_services",
    "run_as",
    "shipped_mosquitto_conf",
    "wait_for_port",
]


@dataclass(frozen=True, slots=True)
class Endpoints:
    database_url: str
    mqtt_url: str


@contextlib.asynccontextmanager
async def private_services(settings: Settings, *, broker: bool = True) -> AsyncIterator[Endpoints]:
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
