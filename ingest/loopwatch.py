"""The event loop's lag: how late a timer due now actually runs. Every MQTT message, flush,
acknowledgement and HTTP request waits that long for its turn, so it is watched like a
latency (`energy_ingest_event_loop_lag_seconds`, and the longest of the last minute).

Sampled every LAG_SAMPLE_S on the monotonic clock: a callback that holds the loop for longer
than that shows as a lag of nearly its whole length. A lag past the budget (HELD_OVER_S) is
also counted by its cause, told apart by the loop thread's own CPU time over the wait: the
loop was running code all along, or the process was waiting for a CPU (a machine whose cores
are all busy, with PostgreSQL say, delays the loop without any code of ours holding it).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from ingest.lifecycle import Component
from ingest.metrics import Metrics

LAG_SAMPLE_S = 0.01
LAG_MAX_WINDOW_S = 60
HELD_OVER_S = 0.02  # the budget: no request holds the loop longer
BUSY_SHARE = 0.8


class LoopWatch(Component):
    """Watching starts on `async with` and stops at the end of the block."""

    name = "loop-watch"

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._max_by_second: deque[list[float]] = deque()  # [second, longest lag in it]
        metrics.event_loop_lag_max.set_function(self.recent_max_s)

    def recent_max_s(self) -> float:
        self._forget(time.monotonic())
        return max((lag for _, lag in self._max_by_second), default=0.0)

    async def run(self) -> None:
        observe = self._metrics.event_loop_lag.observe
        held = self._metrics.event_loop_held
        while True:
            due = time.monotonic() + LAG_SAMPLE_S
            cpu_before = time.thread_time()
            await asyncio.sleep(LAG_SAMPLE_S)
            now = time.monotonic()
            lag = max(0.0, now - due)
            observe(lag)
            self._remember(now, lag)
            if lag > HELD_OVER_S:
                # Late because the loop ran code (its thread used the CPU for about as long
                # as the lag), or because the process had no CPU to run on (a busy machine).
                busy = time.thread_time() - cpu_before >= BUSY_SHARE * lag
                held.labels("running" if busy else "waiting for a CPU").inc()

    def _remember(self, now: float, lag: float) -> None:
        second = float(int(now))
        if self._max_by_second and self._max_by_second[-1][0] == second:
            slot = self._max_by_second[-1]
            slot[1] = max(slot[1], lag)
        else:
            self._max_by_second.append([second, lag])
            self._forget(now)

    def _forget(self, now: float) -> None:
        while self._max_by_second and self._max_by_second[0][0] < now - LAG_MAX_WINDOW_S:
            self._max_by_second.popleft()
