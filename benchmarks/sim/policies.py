"""Routing policies compared on the same traces.

`placement_aware` is this project's `PlacementAwareRouter`, called through the same
`choose_replicas` Serve calls (a `PendingRequest` carrying `RoutingHints`, the future
resolved with the replica Serve dispatched to, `on_request_completed` when it ends), with
the placement plan and the replicas' demand-decayed `AdapterSlots`. The others are the
field's behaviour, re-stated here from their documentation (they need a live Serve
controller or a Kubernetes gateway to run as code):

- `ray_multiplex`: Ray Serve's power of two choices with model multiplexing: a request
  for an adapter goes to one of the replicas that report it loaded (two sampled, fewer
  queued requests wins) and only when none holds it, or those are full, to the replicas
  with the fewest adapters loaded; replicas keep adapters LRU; no placement plan.
- `power_of_two`: Ray Serve's default router in front of this project's replicas
  (decayed slots and the placement plan on), as the CPU router benchmark ran it.
- `prefix_only`: Ray Serve's `PrefixCacheAffinityRouter`: power of two when the queues
  are imbalanced (max - min > 10 requests), else the replica whose prefix tree matches
  the most of the prompt (match rate >= 0.1), else the one with the smallest tree.
- `adapter_only`: llm-d's LoRA-affinity scorer alone: 1.0 for replicas running or
  queueing the adapter, 0.8 for those with room for another active adapter
  (< max_loras), 0 otherwise; the best score wins, ties at random. LRU slots.
- `round_robin`: replicas in turn; LRU slots.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from typing import Any, Callable

from ray.serve._private.common import RequestMetadata
from ray.serve.request_router import PendingRequest

from ruvllm.router.hints import HINTS_KWARG, RoutingHints
from ruvllm.router.placement_router import PlacementAwareRouter
from benchmarks.sim.replica import DEPLOYMENT, SimReplica


class Policy:
    name = ""
    slots = "lru"  # "decay": AdapterSlots; "lru": LRUSlots
    plan = False  # the placement controller pre-loads adapters

    def __init__(self, rng: random.Random, clock: Callable[[], float], **router_kwargs: Any):
        self.rng = rng
        self.clock = clock
        self.decision_s: list[float] = []  # wall clock
        # CPU time of this thread: on a shared machine the wall clock also counts the
        # slices the OS gives other processes (measured: 1-2% of decisions took 4-14 ms
        # of wall time at 8 replicas, every one of them preempted mid-call).
        self.decision_cpu_s: list[float] = []

    async def rank(self, request_id: str, hints: RoutingHints,
                   replicas: list[SimReplica]) -> list[SimReplica]:
        started, cpu = time.perf_counter(), time.thread_time()
        ranked = self._rank(hints, replicas)
        self.decision_s.append(time.perf_counter() - started)
        self.decision_cpu_s.append(time.thread_time() - cpu)
        return ranked

    def _rank(self, hints: RoutingHints, replicas: list[SimReplica]) -> list[SimReplica]:
        raise NotImplementedError

    def routed(self, request_id: str, hints: RoutingHints, replica: SimReplica) -> None:
        pass

    def completed(self, request_id: str, replica: SimReplica) -> None:
        pass

    def replicas_updated(self, replicas: list[SimReplica]) -> None:
        """Serve's controller broadcast the replicas' latest info (routing stats)."""

    def _two(self, pool: list[SimReplica]) -> list[SimReplica]:
        pick = self.rng.sample(pool, 2) if len(pool) >= 2 else list(pool)
        return sorted(pick, key=lambda r: r.ongoing)


class PlacementAware(Policy):
    name, slots, plan = "placement_aware", "decay", True

    def __init__(self, rng, clock, **router_kwargs):
        super().__init__(rng, clock)
        self.router = PlacementAwareRouter(deployment_id=DEPLOYMENT,
                                           handle_source=_handle_source())
        self.router.initialize_state(clock=clock, **router_kwargs)
        self._pending: dict[str, PendingRequest] = {}

    async def rank(self, request_id, hints, replicas):
        pending = PendingRequest(args=[], kwargs={HINTS_KWARG: hints}, metadata=RequestMetadata(
            request_id=request_id, internal_request_id=request_id))
        started, cpu = time.perf_counter(), time.thread_time()
        ranks = await self.router.choose_replicas(replicas, pending)
        self.decision_s.append(time.perf_counter() - started)
        self.decision_cpu_s.append(time.thread_time() - cpu)
        self._pending[request_id] = pending
        return [r for rank in ranks for r in rank]

    def routed(self, request_id, hints, replica):
        # Serve resolves the request's future with the replica it dispatched to.
        self._pending.pop(request_id).future.set_result(replica)

    def completed(self, request_id, replica):
        self.router.on_request_completed(replica.replica_id, request_id)

    def replicas_updated(self, replicas):
        # What `PlacementAwareRouter.update_replicas` does with new stats; the rest of
        # that hook (Serve's own bookkeeping, queue-length probes) needs a live Serve.
        self.router.index_replicas(replicas)


class PowerOfTwo(Policy):
    name, slots, plan = "power_of_two", "decay", True

    def _rank(self, hints, replicas):
        two = self._two(replicas)
        return two + [r for r in replicas if r not in two]


class RayMultiplex(Policy):
    name, slots, plan = "ray_multiplex", "lru", False

    def _rank(self, hints, replicas):
        adapter = hints.adapter
        if adapter is None:
            pool = replicas
        else:
            pool = [r for r in replicas if adapter in r.routing_stats["adapters"]]
            if not pool or all(r.ongoing >= r.profile.max_ongoing_requests for r in pool):
                fewest = min(len(r.routing_stats["adapters"]) for r in replicas)
                pool = [r for r in replicas if len(r.routing_stats["adapters"]) == fewest]
        two = self._two(pool)
        return two + [r for r in self._two(replicas) if r not in two]


class PrefixOnly(Policy):
    name, slots, plan = "prefix_only", "lru", False
    IMBALANCE = 10
    MATCH_RATE = 0.1
    TREE_TOKENS = 4_000_000  # per replica: Ray evicts its tree past a size bound

    def __init__(self, rng, clock, **_):
        super().__init__(rng, clock)
        self._trees: dict[str, OrderedDict[int, int]] = {}
        self._sizes: dict[str, int] = {}
        self._chains: dict[str, list[tuple[int, int]]] = {}

    def set_chain(self, request_id: str, chain: list[tuple[int, int]]) -> None:
        self._chains[request_id] = chain

    def _rank(self, hints, replicas):
        loads = [r.ongoing for r in replicas]
        if max(loads) - min(loads) > self.IMBALANCE:
            two = self._two(replicas)
            return two + [r for r in replicas if r not in two]
        chain = self._chains.get(self._current, [])
        best, best_match = [], 0
        for r in replicas:
            tree = self._trees.get(r.name)
            matched = 0
            if tree:
                for key, tokens in chain:
                    if key not in tree:
                        break
                    matched += tokens
            if matched > best_match:
                best, best_match = [r], matched
            elif matched == best_match and matched > 0:
                best.append(r)
        if best and best_match >= self.MATCH_RATE * max(1, hints.prompt_tokens):
            first = min(best, key=lambda r: (r.ongoing, self.rng.random()))
        else:
            smallest = min(self._sizes.get(r.name, 0) for r in replicas)
            first = self.rng.choice([r for r in replicas if self._sizes.get(r.name, 0) == smallest])
        return [first] + [r for r in replicas if r is not first]

    async def rank(self, request_id, hints, replicas):
        self._current = request_id
        return await super().rank(request_id, hints, replicas)

    def routed(self, request_id, hints, replica):
        tree = self._trees.setdefault(replica.name, OrderedDict())
        for key, tokens in self._chains.pop(request_id, []):
            if key in tree:
                tree.move_to_end(key)
                continue
            tree[key] = tokens
            self._sizes[replica.name] = self._sizes.get(replica.name, 0) + tokens
        while self._sizes.get(replica.name, 0) > self.TREE_TOKENS:
            _, t = tree.popitem(last=False)
            self._sizes[replica.name] -= t


class AdapterOnly(Policy):
    name, slots, plan = "adapter_only", "lru", False

    def _rank(self, hints, replicas):
        adapter = hints.adapter
        if adapter is None:
            first = self.rng.choice(replicas)
            return [first] + [r for r in replicas if r is not first]
        scored: dict[float, list[SimReplica]] = {}
        for r in replicas:
            active = r.adapters_in_flight
            score = (1.0 if adapter in active
                     else 0.8 if len(active) < r.profile.max_loras else 0.0)
            scored.setdefault(score, []).append(r)
        top = scored[max(scored)]
        first = self.rng.choice(top)
        return [first] + [r for r in replicas if r is not first]


class RoundRobin(Policy):
    name, slots, plan = "round_robin", "lru", False

    def __init__(self, rng, clock, **_):
        super().__init__(rng, clock)
        self._next = 0

    def _rank(self, hints, replicas):
        self._next += 1
        start = self._next % len(replicas)
        return replicas[start:] + replicas[:start]


def _handle_source() -> Any:
    from ray.serve._private.common import DeploymentHandleSource
    return DeploymentHandleSource.UNKNOWN


POLICIES = {p.name: p for p in (PlacementAware, RayMultiplex, PowerOfTwo, PrefixOnly,
                                AdapterOnly, RoundRobin)}
