"""PlacementAwareRouter's choices, driven through Ray Serve's RequestRouter interface
with fake replicas (pure routing logic; the e2e tests route real requests)."""

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

from ruvllm.router.hints import RoutingHints
from ruvllm.router.placement_router import PlacementAwareRouter, RoundRobinRouter

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


def make_router(**kwargs: Any) -> PlacementAwareRouter:
    router = PlacementAwareRouter(deployment_id=DEPLOYMENT,
                                  handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(ledger_ttl_s=60, **kwargs)
    return router


async def route(router, replicas, request_id: str, hints: RoutingHints, force=None):
    """Rank, then resolve the request's future as Serve would: with the first rank, or
    with `force` (as when Serve falls back past a full replica)."""
    req = pending(request_id, hints)
    ranks = await router.choose_replicas(replicas, req)
    chosen = force or ranks[0][0]
    req.future.set_result(chosen)
    await asyncio.sleep(0)
    return chosen


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


def test_a_burst_routed_in_one_step_spreads():
    """One Serve routing task drains every pending request it finds without yielding to
    the event loop (with cached queue lengths nothing in between suspends), so no
    future's callback runs between those decisions: each must already see the ones
    before it. Charged only in the callback, a burst of 12 went 10 / 2 (CI, 12-02)."""
    async def scenario():
        router = make_router()
        a, b = replica("a"), replica("b")
        burst = [pending(f"r{i}", RoutingHints(prompt_tokens=30, max_tokens=48))
                 for i in range(12)]
        for req in burst:  # choose and resolve, as Serve does, all in one step
            req.future.set_result((await router.choose_replicas([a, b], req))[0][0])
        await asyncio.sleep(0)  # now the callbacks run
        chosen = [req.future.result() for req in burst]
        assert chosen.count(a) == chosen.count(b) == 6
        assert router.queued_tokens(a) == router.queued_tokens(b) == 6 * 78

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


def test_adapter_residency_wins_within_the_imbalance_bound():
    async def scenario():
        router = make_router(max_imbalance_tokens=500, cold_adapter_penalty_tokens=1000)
        holder = replica("holder", adapters=["a1"], adapter_slots_free=1)
        other = replica("other", adapters=[], adapter_slots_free=2)
        for i in range(3):
            got = await route(router, [holder, other], f"r{i}", RoutingHints(10, 90, adapter="a1"))
            assert got is holder
        # holder now has 300 queued tokens; 2 more pass the 500 bound...
        await route(router, [holder, other], "r3", RoutingHints(10, 90, adapter="a1"))
        await route(router, [holder, other], "r4", RoutingHints(10, 90, adapter="a1"))
        # ...and still fine: the cold penalty (1000) outweighs 500 tokens of imbalance
        got = await route(router, [holder, other], "r5", RoutingHints(10, 90, adapter="a1"))
        assert got is holder
        for i in range(6, 20):
            await route(router, [holder, other], f"r{i}", RoutingHints(10, 90, adapter="a1"))
        # Load eventually beats residency: the adapter spills onto the other replica.
        assert router.queued_tokens(other) > 0

    asyncio.run(scenario())


def test_router_remembers_where_it_just_sent_an_adapter():
    async def scenario():
        router = make_router()
        a, b = replica("a"), replica("b")
        first = await route(router, [a, b], "x1", RoutingHints(5, 5, adapter="new"))
        router.on_request_completed(first.replica_id, "x1")
        again = await route(router, [a, b], "x2", RoutingHints(5, 5, adapter="new"))
        assert again is first, "the replica that just loaded it must win until reports arrive"

    asyncio.run(scenario())


def test_session_and_prefix_affinity_are_bounded_by_load():
    async def scenario():
        router = make_router(max_imbalance_tokens=300)
        a, b = replica("a"), replica("b")
        home = await route(router, [a, b], "s1", RoutingHints(50, 50, session_id="sess"))
        router.on_request_completed(home.replica_id, "s1")
        # Same session again: back home even with a tie on load.
        for i in range(5):
            got = await route(router, [a, b], f"s{i + 2}", RoutingHints(50, 50, session_id="sess"))
            router.on_request_completed(got.replica_id, f"s{i + 2}")
            assert got is home
        # Same prompt prefix, new session: follows the prefix.
        got = await route(router, [a, b], "p1",
                          RoutingHints(50, 50, prefix_keys=((32, 11), (64, 22))))
        router.on_request_completed(got.replica_id, "p1")
        got2 = await route(router, [a, b], "p2",
                           RoutingHints(50, 50, prefix_keys=((32, 11), (64, 22), (128, 33))))
        assert got2 is got, "the longest known prefix must match"
        router.on_request_completed(got2.replica_id, "p2")
        # Pile load on home: affinity yields once it is > 300 tokens busier.
        for i in range(4):
            await route(router, [a, b], f"load{i}", RoutingHints(100, 0), force=home)
        other = b if home is a else a
        assert router.queued_tokens(home) - router.queued_tokens(other) > 300
        got = await route(router, [a, b], "s-late", RoutingHints(50, 50, session_id="sess"))
        assert got is other

    asyncio.run(scenario())


def test_a_short_shared_prefix_tolerates_little_imbalance():
    async def scenario():
        router = make_router(prefix_imbalance_per_token=2.0)
        a, b = replica("a"), replica("b")
        short = ((32, 7),)  # e.g. a shared one-block system prompt
        home = await route(router, [a, b], "q0", RoutingHints(40, 60, prefix_keys=short))
        # 100 tokens queued on home > 2 x 32 allowed: the next one goes elsewhere.
        nxt = await route(router, [a, b], "q1", RoutingHints(40, 60, prefix_keys=short))
        assert nxt is not home

    asyncio.run(scenario())


def test_round_robin_alternates():
    async def scenario():
        router = RoundRobinRouter(deployment_id=DEPLOYMENT,
                                  handle_source=DeploymentHandleSource.UNKNOWN)
        a, b = replica("a"), replica("b")
        firsts = [(await router.choose_replicas([a, b], pending(f"q{i}", None)))[0][0]
                  for i in range(4)]
        assert firsts[0] is not firsts[1] and firsts[0] is firsts[2]

    asyncio.run(scenario())


def test_a_holder_with_headroom_wins_whatever_the_imbalance():
    """Queued tokens below `affinity_headroom` of the replica's capacity: the request
    starts there at once, so the holder beats an idle replica that would load it."""
    async def scenario():
        router = make_router(max_imbalance_tokens=100, cold_adapter_penalty_tokens=100,
                             affinity_headroom=0.5)
        cap = {"kv_capacity_tokens": 10_000, "max_num_seqs": 8}
        holder = replica("holder", adapters=["a1"], adapter_slots_free=1, **cap)
        other = replica("other", adapters=[], adapter_slots_free=2, **cap)
        for i in range(3):  # 3 x 1,000 tokens: far past the 100-token bounds
            got = await route(router, [holder, other], f"r{i}", RoutingHints(500, 500, adapter="a1"))
            assert got is holder
        # A fourth and fifth would take it to 5,000 tokens (50%) and beyond: spill.
        await route(router, [holder, other], "r3", RoutingHints(500, 500, adapter="a1"))
        got = await route(router, [holder, other], "r4", RoutingHints(500, 500, adapter="a1"))
        assert got is other

    asyncio.run(scenario())


def test_a_session_keeps_its_replica_while_it_has_headroom():
    async def scenario():
        router = make_router(max_imbalance_tokens=10, affinity_headroom=0.5)
        cap = {"kv_capacity_tokens": 10_000, "max_num_seqs": 4}
        a, b = replica("a", **cap), replica("b", **cap)
        home = await route(router, [a, b], "s0", RoutingHints(50, 50, session_id="sess"))
        got = await route(router, [a, b], "s1", RoutingHints(50, 50, session_id="sess"))
        assert got is home, "100 queued tokens > the 10-token bound, but 1 of 4 sequences"
        # Two requests in flight = half its max_num_seqs: no headroom, the bound applies.
        got = await route(router, [a, b], "s2", RoutingHints(50, 50, session_id="sess"))
        assert got is not home

    asyncio.run(scenario())


def test_a_large_cluster_scores_a_sample_but_always_the_adapters_holders():
    async def scenario():
        from ruvllm.router.placement_router import RANKED, SCANNED
        router = make_router()
        replicas = [replica(f"r{i}", adapters=[], adapter_slots_free=1) for i in range(4 * SCANNED)]
        holder = replica("holder", adapters=["rare"], adapter_slots_free=0)
        replicas.insert(len(replicas) // 2, holder)
        for i in range(20):
            req = pending(f"q{i}", RoutingHints(10, 10, adapter="rare"))
            ranks = await router.choose_replicas(replicas, req)
            assert ranks[0] == [holder]
            assert len(ranks) == RANKED + 1 and all(len(r) == 1 for r in ranks[:RANKED])
            flat = [r for rank in ranks for r in rank]
            assert sorted(id(r) for r in flat) == sorted(id(r) for r in replicas)
            req.future.cancel()

    asyncio.run(scenario())


def test_a_large_cluster_learns_a_new_holder_when_serve_delivers_new_stats():
    """Past `SCANNED` replicas the decision scores a sample and the adapter's known holders;
    who holds what is indexed when Serve hands over new routing stats (`update_replicas`),
    so a replica that just loaded an adapter is found without a pass over the cluster per
    decision."""
    async def scenario():
        from ruvllm.router.placement_router import SCANNED
        router = make_router()
        replicas = [replica(f"r{i}", adapters=[], adapter_slots_free=0) for i in range(4 * SCANNED)]
        router.update_replicas(replicas)
        candidates = router._replicas_list  # what Serve passes to choose_replicas
        req = pending("before", RoutingHints(10, 10, adapter="rare"))
        await router.choose_replicas(candidates, req)
        req.future.cancel()
        loaded = replicas[SCANNED + 7]
        loaded.routing_stats = {"adapters": ["rare"], "adapter_slots_free": 0}  # a new report
        router.update_replicas(replicas)
        candidates = router._replicas_list
        for i in range(20):
            req = pending(f"q{i}", RoutingHints(10, 10, adapter="rare"))
            ranks = await router.choose_replicas(candidates, req)
            assert ranks[0] == [loaded]
            req.future.cancel()

    asyncio.run(scenario())


def test_a_replica_whose_engine_died_is_left_out_until_serve_drops_it():
    """An engine-dead replica answers at once, so it looks idle (empty ledger, zero KV):
    once a request comes back with `avoid_replica`, neither it nor any later request goes
    there, while another replica is left; the note ends with the replica or its bound."""
    async def scenario():
        now = [0.0]
        router = make_router(clock=lambda: now[0])
        dead, busy = replica("dead"), replica("busy", kv_usage=0.9, kv_capacity_tokens=10_000)
        plain = RoutingHints(prompt_tokens=10, max_tokens=10)
        assert (await router.choose_replicas([dead, busy], pending("p0", plain)))[0][0] is dead
        retry = RoutingHints(prompt_tokens=10, max_tokens=10, avoid_replica="dead")
        ranks = await router.choose_replicas([dead, busy], pending("p1", retry))
        assert [r for rank in ranks for r in rank] == [busy]
        for i in range(5):  # later requests, which carry no hint, keep away too
            ranks = await router.choose_replicas([dead, busy], pending(f"q{i}", plain))
            assert [r for rank in ranks for r in rank] == [busy]
        # With no other replica left, it is still offered (a 503 beats no answer).
        assert (await router.choose_replicas([dead], pending("only", plain)))[0][0] is dead
        # The note goes when Serve tells the router the actor died (its id is not reused),
        router.on_replica_actor_died(dead.replica_id)
        assert (await router.choose_replicas([dead, busy], pending("p2", plain)))[0][0] is dead
        # and a wrong note expires.
        await router.choose_replicas([dead, busy], pending("p3", retry))
        assert (await router.choose_replicas([dead, busy], pending("p4", plain)))[0][0] is busy
        now[0] += 61.0
        assert (await router.choose_replicas([dead, busy], pending("p5", plain)))[0][0] is dead

    asyncio.run(scenario())


def test_the_hints_ride_in_the_replicas_request_envelope():
    """The ingress calls `generate(EngineRequest)`: the router reads the hints from the
    envelope, its first argument, and charges the replica Serve picked."""
    from ruvllm.deployments.protocol import EngineRequest

    async def scenario():
        router = make_router()
        a, b = replica("a"), replica("b")
        envelope = EngineRequest("chat", object(), "e1",
                                 RoutingHints(prompt_tokens=90, max_tokens=10))
        req = PendingRequest(args=[envelope], kwargs={}, metadata=RequestMetadata(
            request_id="e1", internal_request_id="e1"))
        ranks = await router.choose_replicas([a, b], req)
        req.future.set_result(ranks[0][0])
        await asyncio.sleep(0)
        assert router.queued_tokens(ranks[0][0]) == 100

    asyncio.run(scenario())


def test_a_request_that_ends_before_its_routing_is_noted_is_never_charged():
    """Serve resolves the routing future, then sends; a send that fails at once (an
    argument that does not pickle, measured on house3) is reported finished before the
    future's callback runs. Charged after that, it stayed in the ledger until its TTL
    (900 s): two such requests (392 tokens) later split 12 requests 3 / 9."""
    async def scenario():
        router = make_router()
        a, b = replica("a"), replica("b")
        req = pending("lost", RoutingHints(prompt_tokens=190, max_tokens=6))
        ranks = await router.choose_replicas([a, b], req)
        first = ranks[0][0]
        req.future.set_result(first)
        router.on_request_completed(first.replica_id, "lost")  # before the callback runs
        await asyncio.sleep(0)
        assert router.queued_tokens(first) == 0

    asyncio.run(scenario())


def test_a_replica_that_reports_its_engine_dead_is_left_out():
    """The replica says `engine_dead` in its routing stats, which Serve hands to every
    router (`update_replicas`): no request goes there from then on, not even the first one
    a router sends after the death (an ingress whose router never met the dead engine),
    while another replica is left."""
    async def scenario():
        router = make_router()
        dead = replica("dead", engine_dead=True)
        busy = replica("busy", kv_usage=0.9, kv_capacity_tokens=10_000)
        router.update_replicas([dead, busy])
        plain = RoutingHints(prompt_tokens=10, max_tokens=10, session_id="s")
        for i in range(3):
            ranks = await router.choose_replicas([dead, busy], pending(f"p{i}", plain))
            assert [r for rank in ranks for r in rank] == [busy]
        assert (await router.choose_replicas([dead], pending("only", plain)))[0][0] is dead
        # Stats that no longer say so (a wrong report) put it back.
        alive = replica("dead")
        router.update_replicas([alive, busy])
        assert (await router.choose_replicas([alive, busy], pending("back", plain)))[0][0] \
            is alive

    asyncio.run(scenario())
