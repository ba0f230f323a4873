"""The event loop's lag: how late a timer due now actually runs. Every MQTT message, flush,
acknowledgement and HTTP request waits that long for its turn, so it is watched like a
latency (`energy_ingest_event_loop_lag_seconds`, and the longest of the last minute).

Sampled every LAG_SAMPLE_S on the monotonic clock: a callback that holds the loop for longer
than that shows as a lag of nearly its whole length.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from types import TracebackType

from daemon.metrics import Metrics

LAG_SAMPLE_S = 0.01
LAG_MAX_WINDOW_S = 60


class LoopWatch:
    """An async context manager: watching starts on entry and stops on exit."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._max_by_second: deque[list[float]] = deque()  # [second, longest lag in it]
        metrics.event_loop_lag_max.set_function(self.recent_max_s)

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.create_task(self._watch(), name="loop-watch")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def recent_max_s(self) -> float:
        self._forget(time.monotonic())
        return max((lag for _, lag in self._max_by_second), default=0.0)

    async def _watch(self) -> None:
        observe = self._metrics.event_loop_lag.observe
        while True:
            due = time.monotonic() + LAG_SAMPLE_S
            await asyncio.sleep(LAG_SAMPLE_S)
            now = time.monotonic()
            lag = max(0.0, now - due)
            observe(lag)
            self._remember(now, lag)

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
