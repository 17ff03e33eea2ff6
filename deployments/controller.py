"""The placement controller: one small Serve deployment holding cluster-wide state.

It owns the adapter registry (declared adapters, plus those registered at run time) and
the placement table. Engine replicas report to it every `placement.report_period_s` and
get back what to pre-load; ingresses send it adapter demand and read the registry and
the engines' capacity from it. None of this sits on a request's path: ingresses cache
what they read, and routing decisions are made in the ingress's own router.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from adapters.base_model import BaseModelInfo
from adapters.registry import AdapterError, AdapterRegistry, AdapterSpec
from deployments.readiness import ReadyAnnouncement
from router.placement import PlacementPlan, PlacementPlanner, ReplicaReport
from ruvllm.builtin_models import BUILTIN_MODELS
from ruvllm.config import AppConfig
from ruvllm.model_store import resolve_model

logger = logging.getLogger("ray.serve")


def make_registry(config: AppConfig) -> AdapterRegistry:
    """The adapter registry with every declared adapter validated (raises AdapterError)."""
    model_path = resolve_model(config.model.source, config.resolved_cache_dir)
    aliases = {config.model.name, config.model.source}
    if config.model.is_builtin:
        builtin = BUILTIN_MODELS[config.model.source.split(":", 1)[1]]
        aliases |= {builtin.hf_id, builtin.hf_id.rsplit("/", 1)[-1]}
    base = BaseModelInfo.from_checkpoint(model_path, aliases)
    registry = AdapterRegistry(base, config.model.name, config.adapters.allowed_roots,
                               config.engine.max_lora_rank, config.adapters.max_registered)
    for name, path in config.adapters.declared.items():
        registry.register(name, path)
    return registry


class PlacementController:
    """Registered as a one-replica Serve deployment by the app builder."""

    def __init__(self, config: AppConfig) -> None:
        self._config = config
        self._registry = make_registry(config)
        self._planner = PlacementPlanner(
            hot_requests_per_s=config.placement.hot_requests_per_s,
            demand_window_s=config.placement.demand_window_s,
            replica_timeout_s=5 * config.placement.report_period_s + 5,
        )
        self._ready = ReadyAnnouncement.for_config(config)

    # -- engine replicas ------------------------------------------------------------------

    def report(self, report: ReplicaReport) -> PlacementPlan:
        paths = {name: spec.path for name, spec in self._registry.snapshot().items()}
        return self._planner.report(report, paths)

    # -- ingresses ------------------------------------------------------------------------

    def sync(self, demand: dict[str, int], known_version: int) -> dict[str, Any]:
        """Record an ingress's demand; return capacity and, if changed, the registry."""
        self._planner.record_demand(demand)
        kv_tokens, max_seqs = self._planner.capacity()
        state: dict[str, Any] = {
            "kv_tokens": kv_tokens,
            "max_seqs": max_seqs,
            # Each dedicated model's own replicas: requests for it are admitted there.
            "dedicated_capacity": {pool: list(c) for pool, c in
                                   self._planner.capacities().items() if pool is not None},
            "replicas": len(self._planner.replicas()),
            "version": self._registry.version,
        }
        if known_version != self._registry.version:
            state["adapters"] = self._registry.snapshot()
        # Printed here, not in `report`: the ingress that called learns the engines'
        # capacity from this answer, so requests are admitted from now on.
        ready = self._ready.line(self._planner.replicas())
        if ready:
            logger.info(ready)
        return state

    # -- admin API (called by the ingress after it checked the token) --------------------

    def register_adapter(self, name: str, path: str) -> AdapterSpec | AdapterError:
        try:
            spec = self._registry.register(name, path)
        except AdapterError as e:
            return e  # returned, not raised: it is an answer, not a controller failure
        logger.info("registered adapter %s from %s (rank %d)", name, spec.path, spec.rank)
        return spec

    def unregister_adapter(self, name: str) -> AdapterSpec | AdapterError:
        try:
            spec = self._registry.unregister(name)
        except AdapterError as e:
            return e
        self._planner.forget_adapter(name)
        return spec

    def describe(self) -> dict[str, Any]:
        table = self._planner.table()
        return {
            "adapters": [
                {**dataclasses.asdict(spec), "replicas": table.get(name, []),
                 "requests_per_s": round(self._planner.rate(name), 3)}
                for name, spec in sorted(self._registry.snapshot().items())
            ],
            "replicas": [dataclasses.asdict(r) for r in self._planner.replicas()],
        }
