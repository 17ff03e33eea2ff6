"""One simulated cluster run: ingresses (each with its own admission controller and
router, as each Serve ingress replica has), engine replicas, and the placement
controller, replaying one trace under one routing policy.

The project's objects run here as they run in the app: `AdmissionController.admit`
(capacity split between ingresses statically, or by the controller's `CapacityShares`),
the routers' `choose_replicas`, `PlacementPlanner.report` / `record_demand` on the
controller's period, `AdapterSlots` in each replica. Only the engines, the network and
Serve's dispatch loop are simulated.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from benchmarks.sim import clock
from benchmarks.sim.calibration import EngineProfile
from benchmarks.sim.cores import CorePool
from benchmarks.sim.engine import Sequence, chain_keys
from benchmarks.sim.policies import POLICIES, Policy, PrefixOnly
from benchmarks.sim.replica import SimReplica
from benchmarks.sim.trace import TraceRequest, sessions_of, stable_hash
from ruvllm.admission.controller import AdmissionController, Rejected
from ruvllm.router.capacity_shares import CapacityShares
from ruvllm.router.hints import RoutingHints
from ruvllm.adapters.placement import PlacementPlanner
from ruvllm.config import AdmissionConfig, PlacementConfig, RouterConfig

SERVE_BACKOFF_S = 0.025  # Serve retries when every ranked replica is at max_ongoing
# Serve's controller loop period (ray.serve._private.constants.CONTROL_LOOP_INTERVAL_S):
# how often new routing stats reach the routers through `update_replicas`.
SERVE_CONTROL_LOOP_S = 0.1


@dataclass
class SimConfig:
    policy: str = "placement_aware"
    replicas: int = 8
    ingresses: int = 1
    profile: EngineProfile | None = None
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    # How a request picks its ingress: "random" (Serve's proxy spreads requests) or
    # "tenant" (each tenant's connections land on a fixed subset, as keep-alive does).
    ingress_spread: str = "random"
    # How the engines' capacity is split between ingresses: "static" (equal shares, as
    # OpenAIIngress does before the controller has answered, or with one ingress) or
    # "weighted" (the controller's `CapacityShares`: shares follow the tenants each
    # ingress is serving, re-computed on every sync).
    capacity_split: str = "static"
    ttft_slo_s: float = 2.0
    # Requests arriving before this are served but not counted, and adapter/prefix
    # counters start here: a cluster runs for days, so a trace's first minutes, when
    # every adapter's first request must load it, say little about its steady state.
    warmup_s: float = 0.0
    # PlacementPlanner's replan_interval_s: 0 plans per report as the controller does;
    # the scale runs plan once a period (plus whenever a replica's holdings changed),
    # which keeps 256 replicas affordable and moved adapter loads by <4% at 8 replicas.
    planner_replan_s: float = 0.0
    # Simulated seconds the cluster runs before the trace's time 0: replicas report and
    # follow the plan (with `preload_idle_adapters`, registered adapters fill free slots),
    # as a deployed app does between start-up and its first request. Nothing done then
    # is counted: router_bench reads the replicas' counters once the stack is ready and
    # counts from there, and its log shows the plan pre-loading 16 of the 20 adapters
    # into the two replicas' 16 slots 4-11 s before that read (benchmarks/results/router/
    # repeats/run2-placement_aware/logs). 0: replicas start empty at the first request.
    startup_s: float = 0.0
    # Replica i first reports to the planner i x this after replica 0 (engines finish
    # compiling at different times): the first to report gets the plan's first pre-loads
    # all to itself. router_bench's log: 7 s between its two replicas' pre-loads.
    replica_stagger_s: float = 0.0
    seed: int = 0


@dataclass
class RequestRecord:
    tenant: str
    adapter: str | None
    arrival: float
    status: str  # "ok" or the rejection reason
    queue_wait_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    adapter_hit: bool = True
    replica: str = ""
    prompt: list[tuple[str, int]] = field(default_factory=list)  # the trace's segments
    cached_tokens: int = 0  # of the prompt, served from the replica's prefix cache


class Ingress:
    def __init__(self, index: int, cfg: SimConfig, loop: asyncio.AbstractEventLoop,
                 policy: Policy) -> None:
        self.index = index
        self.admission = AdmissionController(cfg.admission, clock=loop.time)
        self.policy = policy
        self.demand: Counter[str] = Counter()


class Simulation:
    def __init__(self, cfg: SimConfig, trace: list[TraceRequest]) -> None:
        self.cfg = cfg
        self.trace = trace
        self.records: list[RequestRecord] = []
        self._seq = 0
        self.counters_at_warmup: dict[str, float] = {}

    # -- set-up ----------------------------------------------------------------------------

    def _build(self, loop: asyncio.AbstractEventLoop) -> None:
        cfg, r = self.cfg, self.cfg.router
        policy_cls = POLICIES[cfg.policy]
        self.rng = random.Random(cfg.seed)
        random.seed(cfg.seed)  # PlacementAwareRouter breaks ties with the global random
        shared = cfg.profile.shared_cores
        # One machine per `shared.cores` replicas, each engine bound to a core of its own.
        pools = ([CorePool(shared) for _ in range(-(-cfg.replicas // shared.cores))]
                 if shared is not None else [])
        self.replicas = [SimReplica(i, cfg.profile, loop, policy_cls.slots,
                                    cores=pools[i // shared.cores] if pools else None)
                         for i in range(cfg.replicas)]
        router_kwargs = dict(session_affinity=r.session_affinity, prefix_affinity=r.prefix_affinity,
                             max_imbalance_tokens=r.max_imbalance_tokens,
                             prefix_imbalance_per_token=r.prefix_imbalance_per_token,
                             cold_adapter_penalty_tokens=r.cold_adapter_penalty_tokens,
                             affinity_headroom=r.affinity_headroom,
                             affinity_table_size=r.affinity_table_size)
        self.ingresses = [Ingress(i, cfg, loop, policy_cls(random.Random(cfg.seed + 100 + i),
                                                           loop.time, **router_kwargs))
                          for i in range(cfg.ingresses)]
        p = cfg.placement
        self.planner = PlacementPlanner(
            hot_requests_per_s=p.hot_requests_per_s, demand_window_s=p.demand_window_s,
            replica_timeout_s=5 * p.report_period_s + 5, clock=loop.time,
            replan_interval_s=cfg.planner_replan_s, preload_idle=p.preload_idle_adapters)
        self.plan_on = policy_cls.plan
        limits = cfg.admission
        self.shares = CapacityShares(
            lambda tenant: limits.tenants.get(tenant, limits.default_tenant).weight,
            timeout_s=5 * p.report_period_s + 5, clock=loop.time)
        adapters = sorted({t.adapter for t in self.trace if t.adapter})
        self.paths = {a: f"/adapters/{a}" for a in adapters}
        d = 1
        depths = []
        while d <= r.prefix_max_blocks:
            depths.append(d * cfg.profile.block_size)
            d *= 2
        self.prefix_depths = depths

    # -- periodic work (what Serve and the controller do every period) ----------------------

    async def _every(self, period: float, offset: float, fn: Any) -> None:
        await asyncio.sleep(offset)
        while True:
            result = fn()
            if asyncio.iscoroutine(result):
                await result
            await asyncio.sleep(period)

    def _broadcast_replicas(self) -> None:
        for ingress in self.ingresses:
            ingress.policy.replicas_updated(self.replicas)

    async def _replica_report(self, replica: SimReplica) -> None:
        plan = self.planner.report(replica.report(), self.paths)
        if self.plan_on:
            for adapter, _ in plan.load:
                await replica.ensure_adapter(adapter, cause="plan")

    def _ingress_sync(self, ingress: Ingress) -> None:
        """ClusterView.sync: demand to the controller, capacity back."""
        demand, ingress.demand = ingress.demand, Counter()
        self.planner.record_demand(dict(demand))
        kv, seqs = self.planner.capacity()
        if self.cfg.capacity_split == "weighted":
            # PlacementController.sync: the ingress's tenant tokens in, its share out.
            self.shares.update(str(ingress.index), ingress.admission.tenant_demand())
            share = self.shares.share(str(ingress.index), kv, seqs)
            ingress.admission.set_capacity(int(kv * share), max(1, int(seqs * share)))
            return
        share = len(self.ingresses)
        ingress.admission.set_capacity(kv // share, max(1, seqs // share) if seqs else 0)

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = Counter()
        for replica in self.replicas:
            out.update(replica.counts)
            out["prefix_queries"] += replica.engine.prefix_queries
            out["prefix_hits"] += replica.engine.prefix_hits
            out["prefix_evicted_tokens"] += replica.engine.evicted_tokens
            out["busy_s"] += replica.engine.busy_now()
        return dict(out)

    async def _snapshot_at_warmup(self) -> None:
        await asyncio.sleep(self.cfg.warmup_s - asyncio.get_running_loop().time())
        self.counters_at_warmup = self.counters()

    # -- one request -----------------------------------------------------------------------

    def _hints(self, t: TraceRequest, chain: list[tuple[int, int]]) -> RoutingHints:
        keys, cum, segs = [], 0, iter(zip(t.prompt, chain))
        pos_key, ends = 0, []
        for (seg, tokens), (key, _) in zip(t.prompt, chain):
            cum += tokens
            ends.append((cum, key))
        i = 0
        for depth in self.prefix_depths:
            while i < len(ends) and ends[i][0] < depth:
                i += 1
            if i == len(ends):
                break
            keys.append((depth, stable_hash(ends[i][1], depth)))
        return RoutingHints(prompt_tokens=t.prompt_tokens, max_tokens=t.max_tokens,
                            model=t.adapter or "base", adapter=t.adapter,
                            adapter_path=self.paths.get(t.adapter) if t.adapter else None,
                            session_id=t.session, prefix_keys=tuple(keys), tenant=t.tenant)

    def _ingress_for(self, t: TraceRequest) -> Ingress:
        if self.cfg.ingress_spread == "tenant":
            # A tenant's connections stay on its own ingress (one each, modulo count).
            return self.ingresses[stable_hash(t.tenant) % len(self.ingresses)]
        return self.rng.choice(self.ingresses)

    async def request(self, t: TraceRequest) -> None:
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        self._seq += 1
        request_id = f"q{self._seq}"
        ingress = self._ingress_for(t)
        chain = chain_keys(t.prompt, stable_hash)
        hints = self._hints(t, chain)
        rec = RequestRecord(t.tenant, t.adapter, arrival, "ok", prompt_tokens=t.prompt_tokens,
                            output_tokens=t.output_tokens, prompt=t.prompt)
        self.records.append(rec)
        try:
            admission = await ingress.admission.admit(t.tenant, hints.predicted_tokens)
        except Rejected as e:
            rec.status = e.reason
            return
        rec.queue_wait_s = admission.waited_s
        if t.adapter:
            ingress.demand[t.adapter] += 1
        policy = ingress.policy
        if isinstance(policy, PrefixOnly):
            policy.set_chain(request_id, chain)
        while True:
            ranked = await policy.rank(request_id, hints, self.replicas)
            chosen = next((r for r in ranked if r.ongoing < r.profile.max_ongoing_requests), None)
            if chosen is not None:
                break
            await asyncio.sleep(SERVE_BACKOFF_S)
        policy.routed(request_id, hints, chosen)
        chosen.ongoing += 1
        seq = Sequence(chain=chain, prompt_tokens=t.prompt_tokens, output_tokens=t.output_tokens,
                       adapter=t.adapter, first_token=loop.create_future(),
                       done=loop.create_future(),
                       output_key=(stable_hash(chain[-1][0], t.output_segment)
                                   if t.output_segment and chain else None))
        try:
            rec.adapter_hit = await chosen.serve(seq)
        finally:
            chosen.ongoing -= 1
            admission.release()
            policy.completed(request_id, chosen)
        rec.ttft_s = seq.first_token.result() - arrival
        rec.e2e_s = seq.done.result() - arrival
        rec.replica = chosen.name
        rec.cached_tokens = seq.cached_tokens

    async def _session(self, turns: list[TraceRequest]) -> None:
        loop = asyncio.get_running_loop()
        for k, t in enumerate(turns):
            if k > 0 and t.think_s is not None:
                await asyncio.sleep(t.think_s)
            else:
                await asyncio.sleep(max(0.0, t.t - loop.time()))
            await self.request(t)

    # -- the run ---------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        """Run on a simulated clock that starts `startup_s` before the trace's time 0."""
        return clock.run(self.run(), start=-self.cfg.startup_s)

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if abs(loop.time() + self.cfg.startup_s) > 1e-9:
            raise ValueError(f"the clock must start at -startup_s ({-self.cfg.startup_s} s), "
                             f"not {loop.time()}: use Simulation.execute()")
        self._build(loop)
        p, r = self.cfg.placement, self.cfg.router
        stagger = self.cfg.replica_stagger_s
        for i, replica in enumerate(self.replicas):  # each has reported once it is up
            if i * stagger == 0:
                self.planner.report(replica.report(), self.paths)
        for ingress in self.ingresses:
            self._ingress_sync(ingress)
        n = len(self.replicas)
        background = [loop.create_task(self._every(
            r.stats_period_s, r.stats_period_s * i / n, replica.refresh_routing_stats))
            for i, replica in enumerate(self.replicas)]
        background += [loop.create_task(self._every(
            p.report_period_s, i * stagger + p.report_period_s * (i + 0.5) / n,
            lambda replica=replica: self._replica_report(replica)))
            for i, replica in enumerate(self.replicas)]
        background += [loop.create_task(self._every(
            p.report_period_s, p.report_period_s * (i + 0.25) / len(self.ingresses),
            lambda ingress=ingress: self._ingress_sync(ingress)))
            for i, ingress in enumerate(self.ingresses)]
        background.append(loop.create_task(self._every(
            SERVE_CONTROL_LOOP_S, 0.0, self._broadcast_replicas)))
        if self.cfg.warmup_s > 0:
            background.append(loop.create_task(self._snapshot_at_warmup()))
        if loop.time() < 0:
            await asyncio.sleep(-loop.time())  # start-up: reports and pre-loads, no traffic
        if self.cfg.warmup_s <= 0:
            self.counters_at_warmup = self.counters()  # what router_bench reads as `before`
        started = loop.time()
        await asyncio.gather(*(self._session(turns) for turns in sessions_of(self.trace)))
        self.duration_s = loop.time() - started
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        return self.summary()

    # -- results ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        from benchmarks.sim.metrics import summarize
        return summarize(self)
