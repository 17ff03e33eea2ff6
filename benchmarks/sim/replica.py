"""An engine replica in the simulation: the project's `AdapterSlots` (or a plain LRU, as
vLLM and Ray's multiplexing keep adapters) around a simulated engine, with the routing
stats Serve hands routers and the reports the placement controller plans from.

`ensure_adapter` follows `ruvllm.deployments.replica.LLMReplica._ensure_adapter` line for line
(that method is tied to a Serve deployment and a real engine; the policy it applies —
which adapter to evict — lives in AdapterSlots, which runs here unchanged).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray.serve._private.common import DeploymentID, ReplicaID

from ruvllm.adapters.slots import AdapterSlots
from benchmarks.sim.calibration import EngineProfile
from benchmarks.sim.cores import CorePool
from benchmarks.sim.engine import Sequence, SimEngine
from ruvllm.adapters.placement import ReplicaReport

DEPLOYMENT = DeploymentID(name="LLMReplica", app_name="sim")


class LRUSlots(AdapterSlots):
    """vLLM's own LoRA cache and Ray Serve's multiplexing: evict the least recently used
    idle adapter. AdapterSlots remembering no demand: every idle adapter then ties at zero
    and its eviction order falls back to least recently used."""

    def note_demand(self, name: str, requests: float = 1.0) -> None:
        pass


class SimReplica:
    def __init__(self, index: int, profile: EngineProfile, loop: asyncio.AbstractEventLoop,
                 slots: str, half_life_s: float = 120.0, cores: CorePool | None = None) -> None:
        self.name = f"r{index}"
        self.replica_id = ReplicaID(unique_id=self.name, deployment_id=DEPLOYMENT)
        self.profile = profile
        self.engine = SimEngine(profile, loop, cores)
        self._loop = loop
        self.slots = (AdapterSlots(profile.adapter_slots, half_life_s=half_life_s, clock=loop.time)
                      if slots == "decay" else LRUSlots(profile.adapter_slots))
        self._adapter_lock = asyncio.Lock()
        self.counts = {"loads": 0, "plan_loads": 0, "evictions": 0, "hits": 0}
        self.ongoing = 0  # requests Serve has dispatched here and not seen finish
        self.routing_stats: dict[str, Any] = {}
        self.refresh_routing_stats()

    # -- what Serve's routers and the controller see -----------------------------------

    def refresh_routing_stats(self) -> None:
        """`LLMReplica.record_routing_stats`; Serve polls it every stats period."""
        s = self.engine.stats()
        self.adapters_in_flight = self.engine.adapters_in_flight()  # scraped by llm-d
        self.routing_stats = {
            "running": s.running, "waiting": s.waiting, "kv_usage": s.kv_usage,
            "kv_capacity_tokens": s.kv_capacity_tokens, "max_num_seqs": s.max_num_seqs,
            "adapters": self.slots.resident(), "adapter_slots_free": self.slots.free,
        }

    def report(self) -> ReplicaReport:
        """`LLMReplica._report`."""
        s = self.engine.stats()
        return ReplicaReport(
            replica_id=self.name, resident=self.slots.resident(), slots=self.slots.capacity,
            queued_tokens=s.kv_usage * s.kv_capacity_tokens,
            kv_capacity_tokens=s.kv_capacity_tokens, max_num_seqs=s.max_num_seqs,
            running=s.running, waiting=s.waiting, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, **self.counts)

    # -- requests ----------------------------------------------------------------------

    async def serve(self, seq: Sequence) -> bool:
        """Run one request; True when its adapter was already resident."""
        adapter = seq.adapter
        hit = True
        if adapter is not None:
            self.slots.acquire(adapter)  # held before loading, as LLMReplica._serve does
        try:
            if adapter is not None:
                hit = await self.ensure_adapter(adapter, cause="request")
            self.engine.submit(seq)
            await seq.done
        finally:
            if adapter is not None:
                self.slots.release(adapter)
        return hit

    async def ensure_adapter(self, name: str, cause: str) -> bool:
        if name in self.slots:
            self.slots.touch(name)
            if cause == "request":
                self.counts["hits"] += 1
            return True
        async with self._adapter_lock:
            if name in self.slots:
                return False  # loaded by someone else while this request waited: not a hit
            if self.profile.adapter_calls_between_steps:
                await self._load_then_evict(name)
            else:
                # The order the H200 scale sections were run with (evict, then load): a
                # slot shows free to the planner for the load's 134 ms. Kept so those
                # sections do not move until they are regenerated.
                for victim in self.slots.victims_for_one_more():
                    if not self.slots.is_idle(victim):
                        continue
                    self.slots.remove(victim)
                    self.counts["evictions"] += 1
                await asyncio.sleep(self.engine.stall(self.profile.lora_load_s))
                self.slots.add(name)
            if cause == "plan":
                self.slots.note_demand(name)
                self.counts["plan_loads"] += 1
            self.counts["loads"] += 1
        return False

    async def _load_then_evict(self, name: str) -> None:
        """LLMReplica._ensure_adapter's order: load, add, then unload the victims one by
        one, so no slot shows free to the planner while the calls wait for the engine
        (between steps: about a step each, measured, cpu_engine --load-path)."""
        await asyncio.sleep(self.engine.call_between_steps(self.profile.lora_load_s))
        victims = self.slots.victims_for_one_more()
        self.slots.add(name)
        for victim in victims:
            if not self.slots.is_idle(victim):
                continue
            self.slots.remove(victim)
            await asyncio.sleep(self.engine.call_between_steps(0.0))
            self.counts["evictions"] += 1
