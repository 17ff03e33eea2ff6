"""The cluster-wide placement table: which replica holds which adapter, and which
should.

Replicas report what they hold and how loaded they are; ingresses report adapter
demand. From that, every report is answered with a plan for the reporting replica:
adapters it should load ahead of requests. An adapter gets one resident copy per
`hot_requests_per_s` of demand (at least one while it is in demand, at most one per
replica); a new copy goes to the least-loaded replica that lacks it and has room. A first
copy needs a free slot: its next request would load it anyway, and evicting for it
would stake one load on a request that may not come. Further copies of a hot adapter may
also take a slot whose adapter had no demand in the window (the replica evicts it).

Slots that demand leaves free are not left empty: a registered adapter held nowhere and
not yet asked for gets one copy in them (`preload_idle`), never evicting anything, so
its first request finds it resident. Without this, at 64 replicas x 1,000 adapters
(32 slots each) most cold loads left after routing were tail adapters' first requests
(benchmarks/sim), which no router can avoid and Ray's multiplexing pays too.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class ReplicaReport:
    replica_id: str
    resident: list[str]  # adapters loaded, least recently used first
    slots: int  # how many adapters the replica keeps resident at most
    queued_tokens: float
    kv_capacity_tokens: int
    max_num_seqs: int
    running: int = 0
    waiting: int = 0
    loads: int = 0
    plan_loads: int = 0  # of `loads`, those the placement plan asked for ahead of requests
    evictions: int = 0
    hits: int = 0
    prefix_cache_queries: int = 0  # vLLM scheduler counters, tokens
    prefix_cache_hits: int = 0
    # The model a dedicated replica serves (X-LoRA mixture, quantized variant); None for
    # the base replicas, which serve the base model and its LoRA adapters.
    dedicated: str | None = None
    # For operators, who read every replica's last report through `GET /v1/adapters`: when
    # it was made (wall clock) and what the engine says of itself (the replica protocol's
    # EngineStats fields, the GPUs it runs on).
    reported_at: float = 0.0
    engine: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlacementPlan:
    load: list[tuple[str, str]] = field(default_factory=list)  # (adapter, path)


@dataclass
class _Replica:
    report: ReplicaReport
    seen_at: float


class PlacementPlanner:
    def __init__(self, hot_requests_per_s: float, demand_window_s: float,
                 replica_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 replan_interval_s: float = 0.0, preload_idle: bool = True) -> None:
        """`replan_interval_s`: reuse the last plan for reports this soon after it (0: a new
        plan per report). A plan costs O(adapters + replicas x slots), and every replica
        reports once a period, so at hundreds of replicas a plan per period, not per
        report, keeps the controller's work linear in replicas (benchmarks/sim)."""
        self._hot_rps = hot_requests_per_s
        self._preload_idle = preload_idle
        self._replan_s = replan_interval_s
        self._planned_at = -math.inf
        self._planned_for: dict[str, set[str]] = {}
        self._window_s = demand_window_s
        self._timeout_s = replica_timeout_s
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}
        self._demand: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self._demand_sum: dict[str, int] = defaultdict(int)  # of the events in `_demand`
        self._plans: dict[str, set[str]] = {}

    # -- inputs --------------------------------------------------------------------------

    def record_demand(self, counts: dict[str, int]) -> None:
        now = self._clock()
        for adapter, n in counts.items():
            if n > 0:
                self._demand[adapter].append((now, n))
                self._demand_sum[adapter] += n

    def forget_adapter(self, adapter: str) -> None:
        self._demand.pop(adapter, None)
        self._demand_sum.pop(adapter, None)

    def report(self, report: ReplicaReport, paths: dict[str, str]) -> PlacementPlan:
        """Take a replica's report; answer with what it should load."""
        self._replicas[report.replica_id] = _Replica(report, self._clock())
        self._expire()
        now = self._clock()
        if (now - self._planned_at >= self._replan_s
                or self._planned_for.get(report.replica_id) != set(report.resident)):
            # A replica's plan is always built from its own latest report: a plan from the
            # holdings it had before would evict for slots it has since filled.
            self._plans = self._assign(paths)
            self._planned_at = now
            self._planned_for = {rid: set(r.report.resident)
                                 for rid, r in self._replicas.items()}
        todo = self._plans.get(report.replica_id, set()) - set(report.resident)
        return PlacementPlan(load=[(a, paths[a]) for a in sorted(todo) if a in paths])

    # -- views ---------------------------------------------------------------------------

    def rate(self, adapter: str) -> float:
        events = self._demand.get(adapter)
        if not events:
            return 0.0
        horizon = self._clock() - self._window_s
        while events and events[0][0] < horizon:
            self._demand_sum[adapter] -= events.popleft()[1]
        return self._demand_sum[adapter] / self._window_s

    def holders(self, adapter: str) -> list[str]:
        return sorted(rid for rid, r in self._replicas.items() if adapter in r.report.resident)

    def table(self) -> dict[str, list[str]]:
        """adapter -> replicas holding it, from the latest reports."""
        self._expire()
        out: dict[str, list[str]] = defaultdict(list)
        for rid, r in sorted(self._replicas.items()):
            for adapter in r.report.resident:
                out[adapter].append(rid)
        return dict(out)

    def replicas(self) -> list[ReplicaReport]:
        self._expire()
        return [r.report for r in self._replicas.values()]

    def capacity(self, dedicated: str | None = None) -> tuple[int, int]:
        """(KV tokens, sequences) the live engines of one pool can hold together: the base
        replicas (None), or the replicas of one dedicated model."""
        reports = [r for r in self.replicas() if r.dedicated == dedicated]
        return (sum(r.kv_capacity_tokens for r in reports), sum(r.max_num_seqs for r in reports))

    def capacities(self) -> dict[str | None, tuple[int, int]]:
        return {pool: self.capacity(pool) for pool in {r.dedicated for r in self.replicas()}}

    # -- the plan ------------------------------------------------------------------------

    def desired_copies(self, adapter: str) -> int:
        return self._copies_for(self.rate(adapter))

    def _copies_for(self, rate: float) -> int:
        if rate <= 0:
            return 0
        return min(len(self._replicas), max(1, math.ceil(rate / self._hot_rps)))

    def _assign(self, paths: dict[str, str]) -> dict[str, set[str]]:
        plans: dict[str, set[str]] = {rid: set() for rid in self._replicas}
        # Rates and holders once per plan, not per adapter x replica: at 256 replicas x
        # 1,000 adapters the per-adapter scans made one plan cost 0.2-0.4 s of CPU, now
        # ~10 ms.
        rates = {a: self.rate(a) for a in paths}
        holders: dict[str, list[str]] = defaultdict(list)
        for rid, r in self._replicas.items():
            for adapter in r.report.resident:
                holders[adapter].append(rid)
        # What each replica keeps: all it holds, or (to make room for a further copy of a
        # hot adapter) only what had demand in the window.
        kept = {rid: (set(r.report.resident),
                      {a for a in r.report.resident
                       if (rates[a] if a in rates else self.rate(a)) > 0})
                for rid, r in self._replicas.items()}
        # Slots promised so far per replica, starting from what each already holds.
        planned_load = {rid: r.report.queued_tokens for rid, r in self._replicas.items()}
        by_rate = sorted(paths, key=rates.__getitem__, reverse=True)
        for adapter in by_rate:
            want = self._copies_for(rates[adapter])
            have = set(holders.get(adapter, ()))
            for rid in have:
                plans[rid].add(adapter)
            missing = want - len(have)
            if missing <= 0:
                continue
            # Never over a wanted adapter: that would only trade one cold load for another.
            candidates = [rid for rid in self._replicas
                          if rid not in have and self._free_slots(rid, plans, kept[rid][bool(have)]) > 0]
            candidates.sort(key=lambda rid: planned_load[rid])
            for rid in candidates[:missing]:
                plans[rid].add(adapter)
                # A copy takes a share of this adapter's traffic off the others.
                planned_load[rid] += 1.0
        if self._preload_idle:
            self._place_idle(by_rate, rates, holders, plans, kept)
        return plans

    def _place_idle(self, adapters: list[str], rates: dict[str, float],
                    holders: dict[str, list[str]], plans: dict[str, set[str]],
                    kept: dict[str, tuple[set[str], set[str]]]) -> None:
        """One copy of each adapter held nowhere and not in demand, into free slots only,
        the emptiest replica first."""
        idle = [a for a in adapters if rates[a] <= 0 and a not in holders]
        if not idle:
            return
        free = [(-self._free_slots(rid, plans, kept[rid][0]), rid)
                for rid, r in self._replicas.items() if r.report.dedicated is None]
        free = [entry for entry in free if entry[0] < 0]
        heapq.heapify(free)
        for adapter in idle:
            if not free:
                return
            negative_free, rid = heapq.heappop(free)
            plans[rid].add(adapter)
            if negative_free + 1 < 0:
                heapq.heappush(free, (negative_free + 1, rid))

    def _free_slots(self, rid: str, plans: dict[str, set[str]], kept: set[str]) -> int:
        """Slots left for planned loads next to the adapters the replica keeps."""
        return self._replicas[rid].report.slots - len(kept | plans[rid])

    def _expire(self) -> None:
        now = self._clock()
        for rid in [rid for rid, r in self._replicas.items() if now - r.seen_at > self._timeout_s]:
            del self._replicas[rid]
