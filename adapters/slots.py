"""A replica's resident adapters: a bounded set that never evicts one in use.

Eviction picks the idle adapter with the least recent demand: a request count that
halves every `half_life_s`, remembered also for adapters no longer resident. Plain LRU
lets every request for a rarely used adapter evict a popular one, which then costs a
second load when its next request comes; with decayed counts the rare adapters take
turns in the same slot and the popular ones stay (ties fall back to LRU).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from typing import Callable

# Demand remembered for this many adapters at most (resident or not).
_MAX_REMEMBERED = 10_000


class AdapterSlots:
    def __init__(self, capacity: int, half_life_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self._half_life_s = half_life_s
        self._clock = clock
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._in_use: Counter[str] = Counter()
        self._demand: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (count, at)

    def __contains__(self, name: str) -> bool:
        return name in self._lru

    def resident(self) -> list[str]:
        """Least recently used first."""
        return list(self._lru)

    @property
    def free(self) -> int:
        return self.capacity - len(self._lru)

    def demand(self, name: str) -> float:
        count, at = self._demand.get(name, (0.0, 0.0))
        return count * 0.5 ** ((self._clock() - at) / self._half_life_s)

    def touch(self, name: str) -> None:
        self._lru.move_to_end(name)

    def add(self, name: str) -> None:
        self._lru[name] = None
        self._lru.move_to_end(name)

    def remove(self, name: str) -> None:
        self._lru.pop(name, None)

    def acquire(self, name: str) -> None:
        """A request for `name` starts (counts as demand, whether resident or not)."""
        self._in_use[name] += 1
        self.note_demand(name)
        if name in self._lru:
            self.touch(name)

    def note_demand(self, name: str, requests: float = 1.0) -> None:
        self._demand[name] = (self.demand(name) + requests, self._clock())
        self._demand.move_to_end(name)
        while len(self._demand) > _MAX_REMEMBERED:
            self._demand.popitem(last=False)

    def release(self, name: str) -> None:
        self._in_use[name] -= 1
        if self._in_use[name] <= 0:
            del self._in_use[name]

    def is_idle(self, name: str) -> bool:
        return name not in self._in_use

    def victims_for_one_more(self) -> list[str]:
        """Idle adapters to evict, least demanded first, so one more fits. When every
        resident adapter is serving a request the list falls short and the set overflows
        until one finishes (vLLM reloads from its path whatever its own cache dropped)."""
        excess = len(self._lru) + 1 - self.capacity
        idle = [(self.demand(name), age, name) for age, name in enumerate(self._lru)
                if name not in self._in_use]
        idle.sort()
        return [name for _, _, name in idle[:max(0, excess)]]
