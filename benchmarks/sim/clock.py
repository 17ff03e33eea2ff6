"""Simulated time for asyncio: an event loop whose clock jumps to the next scheduled
callback instead of sleeping.

The project's admission controller, router and replica code are asyncio code with
injectable clocks; running them on this loop (with `loop.time` as their clock) drives the
real objects — `asyncio.sleep`, `asyncio.wait_for` deadlines and all — in simulated time,
so an hour of cluster traffic takes as long as its callbacks take to run. Callbacks due
at the same instant run in the order they were scheduled (asyncio's own FIFO rule).
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class Stalled(RuntimeError):
    """Nothing is scheduled and nothing is ready: the simulation would wait forever."""


class _InstantSelector(selectors.SelectSelector):
    def __init__(self, loop: "VirtualTimeLoop") -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise Stalled("no callback scheduled: every simulated task is waiting")
        if timeout > 0:
            self._loop.advance(timeout)
        return []  # the loop's only file descriptor is its self-pipe: nothing to read


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        super().__init__(selector=_InstantSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def run(coro: Any, start: float = 0.0) -> Any:
    """asyncio.run for simulated time."""
    loop = VirtualTimeLoop(start)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
