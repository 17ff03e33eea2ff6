"""Tokens this router has sent to each replica and not yet seen finish."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping


@dataclass
class _Entry:
    replica: Hashable
    tokens: int
    since: float


class InflightLedger:
    """Predicted KV tokens in flight per replica.

    A request is charged `prompt + max_tokens` when it is routed and released when
    Serve reports it finished. Entries older than `ttl_s` are dropped so that a
    completion notice that never comes (a request cancelled between routing and
    dispatch) cannot skew the balance for good.
    """

    def __init__(self, ttl_s: float = 900.0, clock: Callable[[], float] = time.monotonic):
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._per_replica: dict[Hashable, int] = defaultdict(int)
        self._requests: dict[Hashable, int] = defaultdict(int)
        self._last_purge = clock()

    def assign(self, request_id: str, replica: Hashable, tokens: int) -> None:
        self.release(request_id)
        self._entries[request_id] = _Entry(replica, tokens, self._clock())
        self._per_replica[replica] += tokens
        self._requests[replica] += 1

    def release(self, request_id: str) -> None:
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self._per_replica[entry.replica] -= entry.tokens
            if self._per_replica[entry.replica] <= 0:
                del self._per_replica[entry.replica]
            self._requests[entry.replica] -= 1
            if self._requests[entry.replica] <= 0:
                del self._requests[entry.replica]

    def tokens(self, replica: Hashable) -> int:
        return self._per_replica.get(replica, 0)

    def tokens_by_replica(self) -> Mapping[Hashable, int]:
        """Every replica's tokens at once (read only), for a router's hot loop."""
        return self._per_replica

    def requests(self, replica: Hashable) -> int:
        return self._requests.get(replica, 0)

    def requests_by_replica(self) -> Mapping[Hashable, int]:
        """Every replica's request count at once (read only), for a router's hot loop."""
        return self._requests

    def drop_replica(self, replica: Hashable) -> None:
        for request_id in [k for k, e in self._entries.items() if e.replica == replica]:
            self.release(request_id)

    def purge_expired(self) -> int:
        """Drop stale entries; cheap to call often (scans at most every ttl/10)."""
        now = self._clock()
        if now - self._last_purge < self._ttl_s / 10:
            return 0
        self._last_purge = now
        stale = [k for k, e in self._entries.items() if now - e.since > self._ttl_s]
        for request_id in stale:
            self.release(request_id)
        return len(stale)

    def __len__(self) -> int:
        return len(self._entries)
