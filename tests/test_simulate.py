"""`energy-ingest simulate` against a running daemon, over MQTT and over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncpg
import httpx

from daemon.services import EmbeddedMosquitto
from tests.helpers import eventually
from tests.services import REPO, DaemonProcess


def simulate(daemon: DaemonProcess, broker: EmbeddedMosquitto, *args: str) -> str:
    env = {**os.environ, "MQTT_URL": broker.url}
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "simulate", "--http-url", daemon.base_url, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


async def test_simulated_fleet_over_mqtt_is_stored_once_despite_copies(
    daemon: DaemonProcess, mosquitto: EmbeddedMosquitto, module_db: str
) -> None:
    simulate(
        daemon,
        mosquitto,
        "--meters",
        "5",
        "--vehicles",
        "5",
        "--minutes",
        "20",
        "--start",
        "1",
        "--processes",
        "2",
        "--duplicate-share",
        "0.2",
        "--late-share",
        "0.1",
        "--seed",
        "11",
        "--prefix",
        "S1",
    )
    conn = await asyncpg.connect(module_db)
    try:

        async def all_there() -> bool:
            n = await conn.fetchval(
                "SELECT count(*) FROM vehicle_readings WHERE vehicle_id LIKE 'S1V-%'"
            )
            return bool(n >= 100)

        await eventually(all_there)
        assert (
            await conn.fetchval("SELECT count(*) FROM meter_readings WHERE meter_id LIKE 'S1M-%'")
            == 100
        )
    finally:
        await conn.close()


def test_simulated_fleet_over_http_with_links_shows_faulty_chargers(
    daemon: DaemonProcess, mosquitto: EmbeddedMosquitto
) -> None:
    simulate(
        daemon,
        mosquitto,
        "--transport",
        "http",
        "--link",
        "--meters",
        "10",
        "--vehicles",
        "10",
        "--minutes",
        "3",
        "--start",
        "0",
        "--faulty-share",
        "0.3",
        "--seed",
        "5",
        "--late-share",
        "0",
        "--duplicate-share",
        "0",
        "--prefix",
        "S2",
    )
    alerts = []
    for n in range(10):
        body = httpx.get(
            f"{daemon.base_url}/v1/analytics/performance/S2V-{n:05d}", timeout=10
        ).json()
        assert body["readings"]["vehicle"] >= 1
        alerts.append(body["alert"])
    assert alerts.count(True) == 3
