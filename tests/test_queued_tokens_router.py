"""QueuedTokensRouter's choices, driven through Ray Serve's RequestRouter interface with
fake replicas (pure routing logic; the e2e tests route real requests)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve.request_router import PendingRequest

from router.hints import RoutingHints
from router.queued_tokens import QueuedTokensRouter

DEPLOYMENT = DeploymentID(name="LLMReplica", app_name="test")


@dataclass
class FakeReplica:
    replica_id: ReplicaID
    routing_stats: dict[str, Any] = field(default_factory=dict)


def replica(name: str, **stats: Any) -> FakeReplica:
    return FakeReplica(ReplicaID(unique_id=name, deployment_id=DEPLOYMENT), dict(stats))


def pending(request_id: str, hints: RoutingHints | None) -> PendingRequest:
    return PendingRequest(
        args=[{}, request_id], kwargs={"hints": hints} if hints else {},
        metadata=RequestMetadata(request_id=request_id, internal_request_id=request_id),
    )


def make_router() -> QueuedTokensRouter:
    router = QueuedTokensRouter(deployment_id=DEPLOYMENT,
                                handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(ledger_ttl_s=60)
    return router


def test_fewest_queued_tokens_wins_and_completion_releases():
    async def scenario():
        router = make_router()
        a, b = replica("a"), replica("b")
        big = pending("big", RoutingHints(prompt_tokens=900, max_tokens=100))
        ranks = await router.choose_replicas([a, b], big)
        assert [len(r) for r in ranks] == [1, 1]
        first = ranks[0][0]
        big.future.set_result(first)  # Serve resolves the future with its pick
        await asyncio.sleep(0)
        assert router.queued_tokens(first) == 1000

        small = pending("small", RoutingHints(prompt_tokens=10, max_tokens=10))
        ranks = await router.choose_replicas([a, b], small)
        other = b if first is a else a
        assert ranks[0][0] is other, "the idle replica must rank first"

        router.on_request_completed(first.replica_id, "big")
        assert router.queued_tokens(first) == 0

    asyncio.run(scenario())


def test_charge_follows_serves_final_pick_not_the_first_rank():
    async def scenario():
        router = make_router()
        a, b = replica("a"), replica("b")
        req = pending("r", RoutingHints(prompt_tokens=50, max_tokens=50))
        ranks = await router.choose_replicas([a, b], req)
        fallback = ranks[1][0]  # e.g. the first was at max_ongoing_requests
        req.future.set_result(fallback)
        await asyncio.sleep(0)
        assert router.queued_tokens(fallback) == 100
        assert router.queued_tokens(ranks[0][0]) == 0

    asyncio.run(scenario())


def test_engine_reported_load_counts_for_traffic_from_other_routers():
    async def scenario():
        router = make_router()
        busy = replica("busy", kv_usage=0.5, kv_capacity_tokens=10000, waiting=3)
        idle = replica("idle", kv_usage=0.0, kv_capacity_tokens=10000, waiting=0)
        for i in range(5):
            ranks = await router.choose_replicas([busy, idle], pending(f"q{i}", RoutingHints(1, 1)))
            assert ranks[0][0] is idle

    asyncio.run(scenario())


def test_pinned_request_goes_only_to_its_replica():
    async def scenario():
        router = make_router()
        a, b = replica("a"), replica("b")
        ranks = await router.choose_replicas([a, b], pending("p", RoutingHints(replica_id="b")))
        assert ranks == [[b]]
        ranks = await router.choose_replicas([a, b], pending("p2", RoutingHints(replica_id="zz")))
        assert ranks == [[]]

    asyncio.run(scenario())


def test_cancelled_request_is_never_charged():
    async def scenario():
        router = make_router()
        a = replica("a")
        req = pending("c", RoutingHints(prompt_tokens=10, max_tokens=10))
        await router.choose_replicas([a], req)
        req.future.cancel()
        await asyncio.sleep(0)
        assert router.queued_tokens(a) == 0

    asyncio.run(scenario())
