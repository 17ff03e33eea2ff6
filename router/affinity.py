"""Bounded LRU maps from a session id or prompt prefix to the replica that served it."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class AffinityTable(Generic[K, V]):
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K | None) -> V | None:
        if key is None:
            return None
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K | None, value: V) -> None:
        if key is None:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def forget_value(self, value: V) -> None:
        for key in [k for k, v in self._entries.items() if v == value]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
