"""How each running part of the daemon starts and stops: as an async context manager.

A `Component` runs its `run()` as a task from `async with` on. Leaving the block asks it to
end well (`finish`: the writer commits what it holds, HTTP answers the requests it has),
within what is left of the shutdown's `Deadline`, and then cancels whatever still runs. The
daemon (`daemon.app`) enters its parts in one `AsyncExitStack`; the order it leaves them in,
the reverse, is the shutdown order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType
from typing import Any, Self


class Deadline:
    """The shutdown's deadline: counted from `start()` (stopping begins); each part takes
    what is left of it, keeping `reserve` seconds for the parts that stop after it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at: float | None = None

    def start(self) -> None:
        if self._at is None:
            self._at = time.monotonic() + self.seconds

    def left(self, reserve: float = 0.0) -> float:
        at = self._at if self._at is not None else time.monotonic() + self.seconds
        return max(0.0, at - time.monotonic() - reserve)


NO_WAITING = Deadline(0.0)


class Component:
    """A part that runs between `async with` and the end of its block.

    `task` is its `run()`; a task that ends while the daemon runs has crashed (or the part
    gave up), and the daemon stops. `finish` is the graceful end, given the deadline set
    with `within` (none: no waiting)."""

    name = "component"
    task: asyncio.Task[None] | None = None
    _deadline: Deadline = NO_WAITING

    async def run(self) -> None:
        raise NotImplementedError

    async def finish(self, deadline: Deadline) -> None:
        """End well within `deadline` (the task is cancelled after, if it still runs)."""

    def within(self, deadline: Deadline) -> Self:
        self._deadline = deadline
        return self

    async def __aenter__(self) -> Self:
        self.task = asyncio.create_task(self.run(), name=self.name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task = self.task
        try:
            if task is not None and not task.done():
                await self.finish(self._deadline)
        finally:
            if task is not None:
                await cancel(task)
                self.task = None


async def cancel(task: asyncio.Task[object]) -> None:
    """Cancel `task` and wait for it to end, whatever it raised."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def first_to_end(components: list[Component], stop: asyncio.Event) -> list[Component]:
    """Wait for `stop`, or for a component's task to end by itself: those ended (crashed)."""
    tasks: dict[asyncio.Task[Any], Component] = {
        c.task: c for c in components if c.task is not None
    }
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({stopped, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel(stopped)
    return [tasks[t] for t in done if t in tasks]
