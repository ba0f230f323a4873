"""The fleet's census for `/metrics`: devices, silent devices, vehicles below the efficiency
threshold, counted every CENSUS_INTERVAL_S in the database, never per scrape.

Silent devices come from the latest-state tables (one row per device: a scan of a few
milliseconds), every round. Vehicles below the threshold come from the fleet's own statement
over the default window, counted and not listed (`limit` 0): a few hundred milliseconds of
one PostgreSQL backend at the design point, so only every EFFICIENCY_EVERY rounds (5 minutes
by default; a 24 h figure moves slowly). Both run on the operators' read pool (the replica,
when there is one), never on the writer's connections. A failed count leaves the gauges as
they were; `energy_ingest_census_last_success_unixtime` says how old they are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from db import analytics, devices
from db.windows import pieces
from ingest.config import Settings
from ingest.lifecycle import Component
from ingest.metrics import Metrics

log = logging.getLogger(__name__)

EFFICIENCY_EVERY = 10  # rounds of the census


class Census(Component):
    """Runs (as a `Component`) from `async with` on: the census, every CENSUS_INTERVAL_S."""

    name = "census"

    def __init__(self, settings: Settings, pool: asyncpg.Pool, metrics: Metrics) -> None:
        self._settings = settings
        self._pool = pool
        self._metrics = metrics
        self._failing = False

    async def run(self) -> None:
        rounds = 0
        while True:
            # (The efficiency again only once it was counted: a failed round tries it again.)
            if await self.count_once(efficiency=rounds % EFFICIENCY_EVERY == 0):
                rounds += 1
            await asyncio.sleep(self._settings.census_interval_s)

    async def count_once(self, *, efficiency: bool = True) -> bool:
        """One census; False if it failed (logged once until it works again)."""
        settings = self._settings
        try:
            async with self._pool.acquire() as conn:
                counts = await devices.census(conn, settings.silent_after_s)
                below = await self._below_threshold(conn) if efficiency else None
        except Exception as error:  # counted again at the next round
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "counting silent devices failed (trying again): %s", error)
            self._failing = True
            return False
        if self._failing:
            log.info("counting silent devices works again")
            self._failing = False
        for stream, (known, silent) in counts.items():
            self._metrics.devices.labels(stream).set(known)
            self._metrics.silent_devices.labels(stream).set(silent)
        if below is not None:
            self._metrics.vehicles_below_efficiency.set(below)
        self._metrics.census_last_success.set(time.time())
        return True

    async def _below_threshold(self, conn: asyncpg.Connection) -> int:
        settings = self._settings
        end = datetime.now(UTC)
        start = end - timedelta(hours=settings.analytics_default_window_h)
        page = await analytics.fleet_page(
            conn,
            pieces(start, end, now=end),
            start,
            end,
            alert_below=settings.alert_efficiency_threshold,
            after=analytics.FIRST_KEY,
            limit=0,
            silent_after_s=settings.silent_after_s,
        )
        return page.total
