"""Placement-aware routing through Ray Serve's `RequestRouter` API.

The router runs inside each handle (in the ingress replicas), so a decision costs no
extra hop. For each request it ranks the engine replicas by:

1. load: tokens queued there — what this router has in flight on the replica (charged
   when it ranks the replica first, moved to the one Serve dispatches to, released when
   the request ends) or what the engine last reported (covering other ingress
   replicas), whichever is larger;
2. within a bounded imbalance above the least-loaded replica: the replica the request's
   session last used (up to `max_imbalance_tokens`), else the one that last served the
   longest matching prompt prefix, so vLLM's prefix cache hits (up to
   `prefix_imbalance_per_token` x the matched length, capped likewise); a replica
   without the request's LoRA adapter pays `cold_adapter_penalty_tokens`.

Before any of that, a replica with headroom — queued tokens and requests below
`affinity_headroom` of its KV capacity and `max_num_seqs`, so the request starts at once —
that holds the request's adapter (and, for a session, is the replica it last used) wins
whatever the imbalance; a prefix alone keeps the bounded imbalance above: on a GPU a few more sequences in a batch cost a few
percent of step time, while an adapter load stalls the engine and a moved session
recomputes its whole context. Token imbalance alone spilled adapters onto non-holders at
~7 requests of difference and caused ~73% of the cold loads at 64 H200 replicas
(benchmarks/sim: 24.0 loads per 1k requests vs Ray multiplexing's 5.5).

Replicas report resident adapters with their routing stats; between reports the router
remembers where it just sent each adapter, since vLLM loads it there on first use.

A replica whose engine died answers at once, so it looks idle. It says so in its routing
stats (`engine_dead`), which Serve pulls every stats period and pushes to every router,
and the router leaves it out from then on (unless no other is left); it exits two
periods later (deployments/replica.py). A request that reaches it before gets a 503
that the ingress sends again with `RoutingHints.avoid_replica`, and from then on this
router leaves that replica out too, until Serve drops it or `DEAD_ENGINE_EXCLUSION_S`
passes.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from dataclasses import dataclass
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

logger = logging.getLogger("ray.serve")

# How long the router trusts its own note that a replica got an adapter, before the
# replica's own report (every stats period) takes over.
OPTIMISTIC_RESIDENCY_S = 5.0
# Replicas ranked one by one; Serve only falls back past the first when it is at
# max_ongoing_requests, so ordering all 256 of a large cluster is wasted work.
RANKED = 8
# Replicas scored per decision at most (plus those holding the adapter and the preferred
# one); see `_scan_order`.
SCANNED = 64
# How long a replica that answered "engine dead" stays out of the choice when Serve has
# not dropped it before: Serve replaces it within its health-check period, and the replica
# exits at once; the bound only keeps a wrong report from excluding a replica for good.
DEAD_ENGINE_EXCLUSION_S = 60.0


@dataclass(slots=True)
class _StatsView:
    """What ranking reads from one routing-stats report."""

    stats: dict[str, Any]
    reported: float  # queued tokens the engine reported
    adapters: frozenset[str]
    penalty_factor: int  # loading into a full replica also evicts someone else's adapter
    waiting: int
    requests: int  # running + waiting, as reported
    room_tokens: float  # headroom bounds; 0 when the replica reports no capacity
    room_requests: float

    @classmethod
    def of(cls, stats: dict[str, Any], headroom: float) -> "_StatsView":
        kv = stats.get("kv_capacity_tokens", 0)
        waiting = stats.get("waiting", 0)
        return cls(stats, stats.get("kv_usage", 0.0) * kv, frozenset(stats.get("adapters", ())),
                   2 if stats.get("adapter_slots_free", 1) <= 0 else 1, waiting,
                   stats.get("running", 0) + waiting, headroom * kv,
                   headroom * stats.get("max_num_seqs", 0))


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
                         affinity_table_size: int = 100_000, affinity_headroom: float = 0.5,
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
        self._headroom = affinity_headroom
        # unique_id -> what the hot loop needs from a replica's routing stats, derived once
        # per stats dict: Serve replaces the dict on every report, never mutates it.
        self._views: dict[str, _StatsView] = {}
        # adapter -> unique_ids whose latest scanned report holds it (kept with the views)
        self._holders: dict[str, set[str]] = {}
        # The replica list the views were last indexed from (Serve passes the same list
        # object to every decision until its next `update_replicas`), by unique_id.
        self._indexed: list | None = None
        self._indexed_len = 0
        self._position: dict[str, int] = {}
        self._strides: list[tuple[int, int]] = []
        self._sessions: AffinityTable[str, ReplicaID] = AffinityTable(affinity_table_size)
        self._prefixes: AffinityTable[int, ReplicaID] = AffinityTable(affinity_table_size)
        # adapter -> {replica unique_id: when this router sent it there}
        self._sent_adapters: dict[str, dict[str, float]] = {}
        # unique_id -> when a request was sent away from it because its engine had died
        self._dead_engines: dict[str, float] = {}
        # unique_ids whose latest routing stats say their engine died (kept with the views)
        self._reported_dead: set[str] = set()
        self._metrics = RouterMetrics()

    # -- what the router knows about a replica ---------------------------------------

    def queued_tokens(self, replica: RunningReplica) -> float:
        return max(self._ledger.tokens(replica.replica_id.unique_id),
                   reported_queued_tokens(replica.routing_stats))

    def holds_adapter(self, replica: RunningReplica, adapter: str) -> bool:
        return self._holds(replica, adapter, self._clock())

    def _holds(self, replica: RunningReplica, adapter: str, now: float) -> bool:
        if adapter in replica.routing_stats.get("adapters", ()):
            return True
        sent_to = self._sent_adapters.get(adapter)
        sent = sent_to.get(replica.replica_id.unique_id) if sent_to else None
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

    def live_candidates(self, candidates: List[RunningReplica],
                        hints: RoutingHints | None) -> List[RunningReplica]:
        """The candidates less those whose engine died (learnt from `avoid_replica`),
        or all of them when none would be left."""
        now = self._clock()
        dead, reported = self._dead_engines, self._reported_dead
        if hints is not None and hints.avoid_replica is not None:
            if hints.avoid_replica not in dead:
                # Said once per replica: this router chose it after its engine had died
                # (tests/e2e/test_faults.py reads this line).
                logger.warning("replica %s answered that its engine died; routing leaves "
                               "it out", hints.avoid_replica)
            dead[hints.avoid_replica] = now
        if not dead and not reported:
            return candidates
        for uid in [u for u, at in dead.items() if now - at >= DEAD_ENGINE_EXCLUSION_S]:
            del dead[uid]
        live = [r for r in candidates
                if r.replica_id.unique_id not in dead and r.replica_id.unique_id not in reported]
        return live or candidates

    def rank(self, candidates: List[RunningReplica],
             hints: RoutingHints | None) -> tuple[List[RunningReplica], str]:
        """The best `RANKED` replicas best first, then the others in no order; and the
        reason the first one won."""
        adapter = hints.adapter if hints else None
        predicted = hints.predicted_tokens if hints else 0
        preferred, why, allowance = self._preferred(hints)
        # Plain tuples over views cached per stats report, keyed by unique_id (a str
        # caches its hash; ReplicaID hashes in Python), over at most `SCANNED` replicas,
        # then a partial sort: a full sort of every replica, per-call parsing of the stats
        # and hashing ReplicaIDs cost ~0.6 ms p50 / 1.5 ms p99 of CPU per decision at 256
        # replicas (benchmarks/sim).
        order = self._scan_order(candidates, adapter, preferred)
        tokens, requests = self._ledger.tokens_by_replica(), self._ledger.requests_by_replica()
        now = self._clock()
        sent_to = self._sent_adapters.get(adapter) if adapter is not None else None
        rows: list[tuple] = []  # (tier, cost, waiting, position in `order`, load)
        append, penalty = rows.append, self._cold_penalty
        views, headroom = self._views, self._headroom
        least = math.inf
        for j, r in enumerate(order):
            uid, stats = r.replica_id.unique_id, r.routing_stats
            v = views.get(uid)
            if v is None or v.stats is not stats:
                v = self._refresh_view(uid, stats)
            load = tokens.get(uid, 0)
            if v.reported > load:
                load = v.reported
            if load < least:
                least = load
            if adapter is None or adapter in v.adapters:
                # Headroom: the request starts at once (see the module docstring).
                tier = 1
                if load + predicted <= v.room_tokens and v.requests < v.room_requests:
                    if requests.get(uid, 0) < v.room_requests:
                        tier = 0
                append((tier, load, v.waiting, j, load))
                continue
            sent = sent_to.get(uid) if sent_to else None
            if sent is None or now - sent >= OPTIMISTIC_RESIDENCY_S:
                append((1, load + penalty * v.penalty_factor, v.waiting, j, load))
            else:
                append((1, load, v.waiting, j, load))
        top = heapq.nsmallest(RANKED, rows) if len(rows) > RANKED else sorted(rows)
        ranked = [order[row[3]] for row in top]
        reason = "load"
        if adapter is not None and top[0][1] == top[0][4]:
            reason = "adapter"
        if preferred is not None:
            row = self._row_of(rows, order, preferred)
            if row is not None:
                first = order[row[3]]
                holds = adapter is None or self._adapter_cost(first, adapter, now) == 0
                # Headroom overrides the imbalance bound only where moving costs an
                # adapter load or a session's whole context. A prefix is often just the
                # chat template's system prompt, shared by every request: headroom there
                # piled all base-model traffic on one replica (tests/e2e/test_routing.py).
                starts_now = row[0] == 0 and (adapter is not None or why == "session")
                if starts_now or (holds and row[4] <= least + allowance):
                    if ranked[0] is not first:
                        if first in ranked:
                            ranked.remove(first)
                        ranked.insert(0, first)
                    reason = why
                else:
                    reason = "load_bound"  # affinity overruled: that replica is too busy
        if len(candidates) > len(ranked):
            ranked += self._the_rest(candidates, ranked)
        return ranked, reason

    def _the_rest(self, candidates: List[RunningReplica],
                  ranked: List[RunningReplica]) -> List[RunningReplica]:
        """`candidates` but `ranked`, in order: by the indexed positions, a few slices;
        an identity test per candidate cost ~10% of a decision at 256 replicas."""
        position = self._position
        if candidates is not self._indexed or len(candidates) != self._indexed_len:
            chosen = {id(r) for r in ranked}
            return [r for r in candidates if id(r) not in chosen]
        rest, start = [], 0
        for i in sorted(position[r.replica_id.unique_id] for r in ranked):
            rest += candidates[start:i]
            start = i + 1
        rest += candidates[start:]
        return rest

    def _preferred(self, hints: RoutingHints | None) -> tuple[Any, str | None, float]:
        """The replica the session last used, else the one that served the longest known
        prefix; with the reason and the imbalance it may carry."""
        if hints is None:
            return None, None, 0.0
        if self._session_affinity:
            preferred = self._sessions.get(hints.session_id)
            if preferred is not None:
                return preferred, "session", self._max_imbalance
        if self._prefix_affinity:
            for length, key in reversed(hints.prefix_keys):  # the longest known prefix wins
                preferred = self._prefixes.get(key)
                if preferred is not None:
                    return preferred, "prefix", min(
                        self._max_imbalance, self._prefix_imbalance_per_token * length)
        return None, None, 0.0

    def _scan_order(self, candidates: List[RunningReplica], adapter: str | None,
                    preferred: Any) -> List[RunningReplica]:
        """The replicas to score, from a random offset (position breaks ties at random,
        cheaper than a random number per replica). Past `SCANNED` replicas: those known
        to hold the adapter, the preferred one, and a random sample of the rest — the
        least loaded of 64 random replicas is within the least-loaded 2% of 256 at
        p > 0.7 and the best 5% at p > 0.96, and the decision's cost stops growing with
        the cluster: who holds what is indexed when Serve delivers new stats
        (`update_replicas`), not here."""
        n = len(candidates)
        if n <= SCANNED:
            offset = random.randrange(n) if n > 1 else 0
            return candidates[offset:] + candidates[:offset] if offset else candidates
        if candidates is not self._indexed or n != self._indexed_len:
            self.index_replicas(candidates)  # a list Serve's update never showed us
        # Every `stride`-th replica from a random offset, the stride drawn among those
        # coprime with n: every replica as likely to be scored as in a random sample and
        # neighbours in Serve's list rarely together (their stats are often reported
        # together), for two draws instead of `random.sample`'s 64, ~15% of a decision
        # at 256 replicas.
        offset = random.randrange(n)
        stride, inverse = random.choice(self._strides)
        order = [candidates[(offset + k * stride) % n] for k in range(SCANNED)]
        wanted: list[str] = []
        if adapter is not None:
            wanted += self._holders.get(adapter, ())
            wanted += self._sent_adapters.get(adapter, ())
        if preferred is not None:
            wanted.append(getattr(preferred, "unique_id", None))
        position, added = self._position, set()
        for uid in wanted:
            i = position.get(uid)
            if i is not None and (i - offset) * inverse % n >= SCANNED and i not in added:
                added.add(i)
                order.append(candidates[i])
        return order

    def index_replicas(self, replicas: List[RunningReplica]) -> None:
        """Bring every replica's view and the adapter holder sets up to date: one pass
        over the cluster, run when Serve delivers new routing stats (it calls
        `update_replicas` with the refreshed replica list; the simulator calls this on
        Serve's control-loop period). Done inside the decision, every 0.1 s past 64
        replicas, this pass was most of the decision time at 256 replicas (p99 1.2 ms
        CPU, benchmarks/sim)."""
        views, position = self._views, {}
        for i, r in enumerate(replicas):
            uid = r.replica_id.unique_id
            position[uid] = i
            view = views.get(uid)
            if view is None or view.stats is not r.routing_stats:
                self._refresh_view(uid, r.routing_stats)
        self._position = position
        self._indexed, self._indexed_len = replicas, len(replicas)
        n = len(replicas)
        if n > SCANNED and len(self._strides) != n:  # (stride, its inverse mod n)
            self._strides = [(k, pow(k, -1, n)) for k in range(1, n) if math.gcd(k, n) == 1]

    def _refresh_view(self, uid: str, stats: dict[str, Any]) -> "_StatsView":
        old = self._views.get(uid)
        view = self._views[uid] = _StatsView.of(stats, self._headroom)
        if stats.get("engine_dead"):
            self._reported_dead.add(uid)
        else:
            self._reported_dead.discard(uid)
        gone = old.adapters - view.adapters if old is not None else ()
        for adapter in gone:
            holders = self._holders.get(adapter)
            if holders is not None:
                holders.discard(uid)
                if not holders:
                    del self._holders[adapter]
        for adapter in view.adapters - old.adapters if old is not None else view.adapters:
            self._holders.setdefault(adapter, set()).add(uid)
        return view

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
        self._ledger.purge_expired()
        ranked, reason = self.rank(self.live_candidates(candidate_replicas, hints), hints)
        if pending_request is not None and hints is not None and ranked:
            self._record_when_routed(pending_request, hints, ranked[0])
        self._metrics.decision_seconds.observe(time.perf_counter() - started)
        self._metrics.decisions.inc(tags={"reason": reason})
        # One replica per rank: Serve tries the best first and falls back in order when a
        # replica is at max_ongoing_requests; past the best few, the rest as one rank (Serve
        # takes the least queued of them).
        ranks = [[r] for r in ranked[:RANKED]]
        if len(ranked) > RANKED:
            ranks.append(ranked[RANKED:])
        return ranks

    def _record_when_routed(self, pending_request: PendingRequest, hints: RoutingHints,
                            first: RunningReplica) -> None:
        # Charged to our first choice at once: one Serve routing task drains every
        # pending request it finds in one step, before any future's callback runs, and
        # charged only there bursts of 12 over two replicas went 12 / 0, 11 / 1, 10 / 2
        # (tests/e2e/router_burst.py, and test_routing.py in CI).
        # Serve resolves the future with the replica it finally picked, so the charge
        # moves there even when it fell back past our first choice.
        request_id = pending_request.metadata.internal_request_id
        self._ledger.assign(request_id, first.replica_id.unique_id, hints.predicted_tokens)
        future = pending_request.future
        if self._tracked_futures.get(request_id) == id(future):
            return
        self._tracked_futures[request_id] = id(future)

        def routed(fut: Any) -> None:
            if self._tracked_futures.get(request_id) != id(fut):
                # Finished before this callback ran (a send that failed at once, e.g.
                # an argument that does not pickle; its release came first), or routed
                # again: charged, it would stay in the ledger until its TTL and skew
                # every choice meanwhile.
                return
            del self._tracked_futures[request_id]
            if fut.cancelled() or fut.exception() is not None:
                self._ledger.release(request_id)
                return
            replica_id = fut.result().replica_id
            self._ledger.assign(request_id, replica_id.unique_id, hints.predicted_tokens)
            self._sessions.put(hints.session_id, replica_id)
            for _, key in hints.prefix_keys:
                self._prefixes.put(key, replica_id)
            if hints.adapter is not None:
                self._sent_adapters.setdefault(hints.adapter, {})[replica_id.unique_id] = (
                    self._clock())

        future.add_done_callback(routed)

    # -- Serve's lifecycle hooks -------------------------------------------------------

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._tracked_futures.pop(internal_request_id, None)  # not to be charged after this
        self._ledger.release(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        # Serve calls this whenever a replica's info changes, routing stats included.
        gone = set(self._replicas) - {r.replica_id for r in replicas}
        super().update_replicas(replicas)
        for replica_id in gone:
            self._forget(replica_id)
        # The very list object Serve passes to `choose_replicas` from now on.
        self.index_replicas(getattr(self, "_replicas_list", replicas))

    def _forget(self, replica_id: Hashable) -> None:
        # The ledger, views and sent-adapter notes are keyed by unique_id (see `rank`).
        uid = getattr(replica_id, "unique_id", replica_id)
        self._ledger.drop_replica(uid)
        self._dead_engines.pop(uid, None)
        self._reported_dead.discard(uid)
        view = self._views.pop(uid, None)
        self._indexed = None  # re-indexed from the next list Serve passes
        for adapter in view.adapters if view is not None else ():
            self._holders.get(adapter, set()).discard(uid)
        self._sessions.forget_value(replica_id)
        self._prefixes.forget_value(replica_id)
        for sent_to in self._sent_adapters.values():
            sent_to.pop(uid, None)


class RoundRobinRouter(RequestRouter):
    """Baseline for benchmarks: replicas in turn, ignoring load and affinity."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next = 0

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None
                              ) -> List[List[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        self._next += 1
        start = self._next % len(ordered)
        return [[r] for r in ordered[start:] + ordered[:start]]
