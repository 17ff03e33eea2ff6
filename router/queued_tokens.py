"""Load-aware routing through Ray Serve's `RequestRouter` API.

The router runs inside each handle (the ingress replica) and ranks engine replicas by
the tokens queued on them: what this router has in flight there (`InflightLedger`,
exact and immediate) and what the engine last reported (`record_routing_stats`, which
also covers traffic from other ingress replicas). Fewer queued tokens wins.
"""

from __future__ import annotations

import random
from typing import Any, List, Optional

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from router.hints import RoutingHints, hints_of
from router.ledger import InflightLedger


def reported_queued_tokens(routing_stats: dict[str, Any]) -> float:
    """Tokens the engine holds in KV, from its last report (0 when unknown)."""
    return routing_stats.get("kv_usage", 0.0) * routing_stats.get("kv_capacity_tokens", 0)


class QueuedTokensRouter(RequestRouter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ledger = InflightLedger()
        self._tracked_futures: dict[str, int] = {}

    def initialize_state(self, ledger_ttl_s: float = 900.0, **_: Any) -> None:
        self._ledger = InflightLedger(ttl_s=ledger_ttl_s)

    def queued_tokens(self, replica: RunningReplica) -> float:
        return max(
            self._ledger.tokens(replica.replica_id),
            reported_queued_tokens(replica.routing_stats),
        )

    def rank(self, candidates: List[RunningReplica]) -> List[RunningReplica]:
        return sorted(
            candidates,
            key=lambda r: (
                self.queued_tokens(r),
                r.routing_stats.get("waiting", 0),
                random.random(),
            ),
        )

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        hints = hints_of(pending_request)
        if hints is not None and hints.replica_id is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == hints.replica_id]]
        self._ledger.purge_expired()
        ranked = self.rank(candidate_replicas)
        if pending_request is not None and hints is not None:
            self._charge_when_routed(pending_request, hints)
        # One replica per rank: Serve tries the least loaded first and falls back in
        # order when a replica is at max_ongoing_requests.
        return [[r] for r in ranked]

    def _charge_when_routed(self, pending_request: PendingRequest, hints: RoutingHints) -> None:
        # Serve resolves the request's future with the replica it finally picked, so
        # charging there is exact even when it falls back past our first choice.
        request_id = pending_request.metadata.internal_request_id
        future = pending_request.future
        if self._tracked_futures.get(request_id) == id(future):
            return
        self._tracked_futures[request_id] = id(future)
        tokens = hints.predicted_tokens

        def charge(fut: Any) -> None:
            if self._tracked_futures.get(request_id) == id(fut):
                del self._tracked_futures[request_id]
            if not fut.cancelled() and fut.exception() is None:
                self._ledger.assign(request_id, fut.result().replica_id, tokens)

        future.add_done_callback(charge)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._ledger.release(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._ledger.drop_replica(replica_id)
