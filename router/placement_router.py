"""Placement-aware routing through Ray Serve's `RequestRouter` API.

The router runs inside each handle (in the ingress replicas), so a decision costs no
extra hop. For each request it ranks the engine replicas by:

1. load: tokens queued there — what this router has in flight on the replica (charged
   when Serve dispatches, released when the request ends) or what the engine last
   reported (covering other ingress replicas), whichever is larger;
2. within a bounded imbalance above the least-loaded replica: the replica the request's
   session last used (up to `max_imbalance_tokens`), else the one that last served the
   longest matching prompt prefix, so vLLM's prefix cache hits (up to
   `prefix_imbalance_per_token` x the matched length, capped likewise); a replica
   without the request's LoRA adapter pays `cold_adapter_penalty_tokens`.

Replicas report resident adapters with their routing stats; between reports the router
remembers where it just sent each adapter, since vLLM loads it there on first use.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Hashable, List, Optional

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from ruvllm.router.affinity import AffinityTable
from ruvllm.router.hints import RoutingHints, hints_of
from ruvllm.router.ledger import InflightLedger
from ruvllm.router.metrics import RouterMetrics

# How long the router trusts its own note that a replica got an adapter, before the
# replica's own report (every stats period) takes over.
OPTIMISTIC_RESIDENCY_S = 5.0


def reported_queued_tokens(routing_stats: dict[str, Any]) -> float:
    """Tokens the engine holds in KV, from its last report (0 when unknown)."""
    return routing_stats.get("kv_usage", 0.0) * routing_stats.get("kv_capacity_tokens", 0)


class PlacementAwareRouter(RequestRouter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initialize_state()

    def initialize_state(self, ledger_ttl_s: float = 900.0, session_affinity: bool = True,
                         prefix_affinity: bool = True, max_imbalance_tokens: int = 4096,
                         prefix_imbalance_per_token: float = 4.0,
                         cold_adapter_penalty_tokens: int = 1024,
                         affinity_table_size: int = 100_000,
                         clock: Callable[[], float] = time.monotonic, **_: Any) -> None:
        # `clock` is injectable so the cluster simulator (benchmarks/sim) runs this very
        # router in simulated time.
        self._clock = clock
        self._ledger = InflightLedger(ttl_s=ledger_ttl_s, clock=clock)
        self._tracked_futures: dict[str, int] = {}
        self._session_affinity = session_affinity
        self._prefix_affinity = prefix_affinity
        self._max_imbalance = max_imbalance_tokens
        self._prefix_imbalance_per_token = prefix_imbalance_per_token
        self._cold_penalty = cold_adapter_penalty_tokens
        self._sessions: AffinityTable[str, ReplicaID] = AffinityTable(affinity_table_size)
        self._prefixes: AffinityTable[int, ReplicaID] = AffinityTable(affinity_table_size)
        # adapter -> {replica: when this router sent it there}
        self._sent_adapters: dict[str, dict[ReplicaID, float]] = {}
        self._metrics = RouterMetrics()

    # -- what the router knows about a replica ---------------------------------------

    def queued_tokens(self, replica: RunningReplica) -> float:
        return max(self._ledger.tokens(replica.replica_id),
                   reported_queued_tokens(replica.routing_stats))

    def holds_adapter(self, replica: RunningReplica, adapter: str) -> bool:
        return self._holds(replica, adapter, self._clock())

    def _holds(self, replica: RunningReplica, adapter: str, now: float) -> bool:
        if adapter in replica.routing_stats.get("adapters", ()):
            return True
        sent_to = self._sent_adapters.get(adapter)
        sent = sent_to.get(replica.replica_id) if sent_to else None
        return sent is not None and now - sent < OPTIMISTIC_RESIDENCY_S

    def adapter_cost(self, replica: RunningReplica, adapter: str | None) -> float:
        return 0.0 if adapter is None else self._adapter_cost(replica, adapter, self._clock())

    def _adapter_cost(self, replica: RunningReplica, adapter: str, now: float) -> float:
        if self._holds(replica, adapter, now):
            return 0.0
        # Loading into a full replica also evicts someone else's adapter.
        full = replica.routing_stats.get("adapter_slots_free", 1) <= 0
        return self._cold_penalty * (2 if full else 1)

    # -- the decision ------------------------------------------------------------------

    def rank(self, candidates: List[RunningReplica],
             hints: RoutingHints | None) -> tuple[List[RunningReplica], str]:
        """Replicas best first, and the reason the first one won."""
        adapter = hints.adapter if hints else None
        # One pass into plain tuples, `queued_tokens` and `adapter_cost` inlined: dicts
        # keyed by replica, a sort-key lambda and two calls per replica cost 0.9 ms of CPU
        # per decision at 256 replicas (p50, benchmarks/sim); this loop ~0.5 ms.
        tokens, now = self._ledger.tokens_by_replica(), self._clock()
        sent_to = self._sent_adapters.get(adapter) if adapter is not None else None
        rows: list[tuple] = []  # (cost, waiting, tie-break, index, load)
        append, tie_break, penalty = rows.append, random.random, self._cold_penalty
        for i, r in enumerate(candidates):
            stats = r.routing_stats
            load = tokens.get(r.replica_id, 0)
            reported = stats.get("kv_usage", 0.0) * stats.get("kv_capacity_tokens", 0)
            if reported > load:
                load = reported
            cost = load
            if adapter is not None and adapter not in stats.get("adapters", ()):
                sent = sent_to.get(r.replica_id) if sent_to else None
                if sent is None or now - sent >= OPTIMISTIC_RESIDENCY_S:
                    full = stats.get("adapter_slots_free", 1) <= 0
                    cost += penalty * (2 if full else 1)
            append((cost, stats.get("waiting", 0), tie_break(), i, load))
        rows.sort()
        ranked = [candidates[row[3]] for row in rows]
        reason = "load"
        if adapter is not None and rows[0][0] == rows[0][4]:
            reason = "adapter"
        if hints is None:
            return ranked, reason
        allowance = self._max_imbalance
        preferred, why = None, None
        if self._session_affinity:
            preferred, why = self._sessions.get(hints.session_id), "session"
        if preferred is None and self._prefix_affinity:
            for length, key in reversed(hints.prefix_keys):  # the longest known prefix wins
                preferred, why = self._prefixes.get(key), "prefix"
                if preferred is not None:
                    allowance = min(allowance, self._prefix_imbalance_per_token * length)
                    break
        if preferred is None:
            return ranked, reason
        row = self._row_of(rows, candidates, preferred)
        if row is None:
            return ranked, reason
        first = candidates[row[3]]
        ceiling = min(row[4] for row in rows) + allowance
        if row[4] <= ceiling and (adapter is None or self._adapter_cost(first, adapter, now) == 0):
            ranked.remove(first)
            ranked.insert(0, first)
            return ranked, why
        return ranked, "load_bound"  # affinity overruled: that replica is too busy

    @staticmethod
    def _row_of(rows: list[tuple], candidates: List[RunningReplica],
                replica_id: ReplicaID) -> tuple | None:
        # Identity first: Serve keeps one ReplicaID object per replica, and a dataclass
        # equality test per candidate costs more than the rest of the decision.
        for row in rows:
            if candidates[row[3]].replica_id is replica_id:
                return row
        return next((row for row in rows if candidates[row[3]].replica_id == replica_id), None)

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        started = time.perf_counter()
        hints = hints_of(pending_request)
        if hints is not None and hints.replica_id is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == hints.replica_id]]
        self._ledger.purge_expired()
        ranked, reason = self.rank(candidate_replicas, hints)
        if pending_request is not None and hints is not None:
            self._record_when_routed(pending_request, hints)
        self._metrics.decision_seconds.observe(time.perf_counter() - started)
        self._metrics.decisions.inc(tags={"reason": reason})
        # One replica per rank: Serve tries the best first and falls back in order when a
        # replica is at max_ongoing_requests.
        return [[r] for r in ranked]

    def _record_when_routed(self, pending_request: PendingRequest, hints: RoutingHints) -> None:
        # Serve resolves the request's future with the replica it finally picked, so what
        # we learn there is exact even when it fell back past our first choice.
        request_id = pending_request.metadata.internal_request_id
        future = pending_request.future
        if self._tracked_futures.get(request_id) == id(future):
            return
        self._tracked_futures[request_id] = id(future)

        def routed(fut: Any) -> None:
            if self._tracked_futures.get(request_id) == id(fut):
                del self._tracked_futures[request_id]
            if fut.cancelled() or fut.exception() is not None:
                return
            replica_id = fut.result().replica_id
            self._ledger.assign(request_id, replica_id, hints.predicted_tokens)
            self._sessions.put(hints.session_id, replica_id)
            for _, key in hints.prefix_keys:
                self._prefixes.put(key, replica_id)
            if hints.adapter is not None:
                self._sent_adapters.setdefault(hints.adapter, {})[replica_id] = self._clock()

        future.add_done_callback(routed)

    # -- Serve's lifecycle hooks -------------------------------------------------------

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._ledger.release(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        gone = set(self._replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self._forget(replica_id)

    def _forget(self, replica_id: Hashable) -> None:
        self._ledger.drop_replica(replica_id)
        self._sessions.forget_value(replica_id)
        self._prefixes.forget_value(replica_id)
        for sent_to in self._sent_adapters.values():
            sent_to.pop(replica_id, None)


class RoundRobinRouter(RequestRouter):
    """Baseline for benchmarks: replicas in turn, ignoring load and affinity."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next = 0

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None
                              ) -> List[List[RunningReplica]]:
        hints = hints_of(pending_request)
        if hints is not None and hints.replica_id is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == hints.replica_id]]
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        self._next += 1
        start = self._next % len(ordered)
        return [[r] for r in ordered[start:] + ordered[:start]]
