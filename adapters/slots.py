"""A replica's resident adapters: a bounded LRU that never evicts one in use."""

from __future__ import annotations

from collections import Counter, OrderedDict


class AdapterSlots:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._in_use: Counter[str] = Counter()

    def __contains__(self, name: str) -> bool:
        return name in self._lru

    def resident(self) -> list[str]:
        """Least recently used first."""
        return list(self._lru)

    @property
    def free(self) -> int:
        return self.capacity - len(self._lru)

    def touch(self, name: str) -> None:
        self._lru.move_to_end(name)

    def add(self, name: str) -> None:
        self._lru[name] = None
        self._lru.move_to_end(name)

    def remove(self, name: str) -> None:
        self._lru.pop(name, None)

    def acquire(self, name: str) -> None:
        self._in_use[name] += 1
        if name in self._lru:
            self.touch(name)

    def release(self, name: str) -> None:
        self._in_use[name] -= 1
        if self._in_use[name] <= 0:
            del self._in_use[name]

    def is_idle(self, name: str) -> bool:
        return name not in self._in_use

    def victims_for_one_more(self) -> list[str]:
        """Idle adapters to evict, oldest first, so one more fits. When every resident
        adapter is serving a request the list falls short and the set overflows until
        one finishes (vLLM reloads from its path whatever its own cache dropped)."""
        excess = len(self._lru) + 1 - self.capacity
        idle = [name for name in self._lru if name not in self._in_use]
        return idle[:max(0, excess)]
