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
import threading
import time
from typing import Any

from ruvllm.adapters.base_model import BaseModelInfo
from ruvllm.adapters.registry import AdapterError, AdapterRegistry, AdapterSpec
from ruvllm.adapters.registry_store import RegisteredAdapter, RegistryState, RegistryStore
from ruvllm.deployments import readiness
from ruvllm.deployments.readiness import ReadyAnnouncement
from ruvllm.router.capacity_shares import CapacityShares
from ruvllm.adapters.placement import PlacementPlan, PlacementPlanner, ReplicaReport
from ruvllm.builtin_models import BUILTIN_MODELS
from ruvllm.config import AppConfig
from ruvllm.model_store import resolve_model

logger = logging.getLogger("ray.serve")


def empty_registry(config: AppConfig) -> AdapterRegistry:
    """A registry over the configured base model, with no adapter in it yet."""
    model_path = resolve_model(config.model.source, config.resolved_cache_dir)
    aliases = {config.model.name, config.model.source}
    if config.model.is_builtin:
        builtin = BUILTIN_MODELS[config.model.source.split(":", 1)[1]]
        aliases |= {builtin.hf_id, builtin.hf_id.rsplit("/", 1)[-1]}
    base = BaseModelInfo.from_checkpoint(model_path, aliases)
    return AdapterRegistry(base, config.model.name, config.adapters.allowed_roots,
                           config.engine.max_lora_rank, config.adapters.max_registered)


def make_registry(config: AppConfig) -> AdapterRegistry:
    """The adapter registry with every declared adapter validated (raises AdapterError):
    the app builder's check, so a deployment with a bad declared adapter fails loudly."""
    registry = empty_registry(config)
    for name, path in config.adapters.declared.items():
        registry.register(name, path)
    return registry


def restore_registry(config: AppConfig, store: RegistryStore) -> AdapterRegistry:
    """The registry a (re)started controller serves: the declared adapters, then those
    its predecessor registered at run time, with the names it retired, all re-validated.

    An adapter that no longer validates (directory gone, files rewritten, root no longer
    allowed) is logged and left out: one bad adapter must not keep the controller, and
    with it every ingress's capacity, down. Each name keeps naming the weights it named
    before: a rewritten adapter is refused (replicas may hold the old weights under that
    name) and stays retired. A declared adapter deleted at run time comes back; the
    config declares it. A declared name is the config's, whatever weights the saved
    state remembers under it: the operator who points it at new weights (or rebuilds
    them) and redeploys gets them, not a 404 (on an H200 a second test session built its
    adapters anew and every declared one was refused). The version continues above the
    saved one, and the result is saved before anyone can read it."""
    state = store.load()
    registry = empty_registry(config)
    registry.version = state.version
    declared = config.adapters.declared
    remembered = {**state.retired, **{n: a.fingerprint for n, a in state.adapters.items()}}
    for name, fingerprint in remembered.items():
        if name not in declared:
            registry.retire(name, fingerprint)
    runtime = {n: a.path for n, a in state.adapters.items() if n not in declared}
    for origin, adapters in (("declared", declared), ("runtime-registered", runtime)):
        for name, path in adapters.items():
            try:
                registry.register(name, path)
            except AdapterError as e:
                logger.error("%s adapter %s left out: %s", origin, name, e.message)
    changed = [n for n in declared if n in remembered and n in registry.fingerprints()
               and tuple(remembered[n]) != tuple(registry.fingerprints()[n])]
    if changed:
        logger.warning("declared adapters %s name other weights than when last saved; "
                       "replicas started from now load the new ones", ", ".join(changed))
    registry.version += 1  # above the saved version even when nothing was registered
    try:
        store.save(registry_state(registry))
    except OSError as e:
        # Serve anyway (a controller that does not start leaves every ingress without
        # capacity); changes answer 503 until the file can be written. This version was
        # not saved, so put it where no saved one reaches: the wall clock in ms is above
        # any count of changes.
        registry.version = max(registry.version, time.time_ns() // 1_000_000)
        logger.error("could not save the adapter registry to %s (%s): adapters registered "
                     "or deleted now are refused until it can be", store.path, e)
    return registry


def registry_state(registry: AdapterRegistry) -> RegistryState:
    fingerprints = registry.fingerprints()
    return RegistryState(
        version=registry.version,
        adapters={name: RegisteredAdapter(spec.path, fingerprints[name])
                  for name, spec in registry.snapshot().items()},
        retired=registry.retired())


class PlacementController:
    """Registered as a one-replica Serve deployment by the app builder."""

    def __init__(self, config: AppConfig) -> None:
        self._config = config
        self._store = RegistryStore(config.registry_state_file)
        self._registry = restore_registry(config, self._store)
        # Serve runs sync methods in a thread pool: a change and the save of the state it
        # made must not interleave with another's, or an older state could be saved last.
        self._registry_lock = threading.Lock()
        self._planner = PlacementPlanner(
            hot_requests_per_s=config.placement.hot_requests_per_s,
            demand_window_s=config.placement.demand_window_s,
            replica_timeout_s=5 * config.placement.report_period_s + 5,
            preload_idle=config.placement.preload_idle_adapters,
        )
        admission = config.admission
        self._shares = CapacityShares(
            lambda tenant: admission.tenants.get(tenant, admission.default_tenant).weight,
            timeout_s=5 * config.placement.report_period_s + 5)
        self._ready = ReadyAnnouncement.for_config(config)
        # Until every live replica has had time to report, the planner's capacity is a
        # partial count (zero right after a restart); see `sync`.
        self._reports_complete_at = time.monotonic() + 2 * config.placement.report_period_s + 1

    # -- engine replicas ------------------------------------------------------------------

    def report(self, report: ReplicaReport) -> PlacementPlan:
        paths = {name: spec.path for name, spec in self._registry.snapshot().items()}
        return self._planner.report(report, paths)

    # -- ingresses ------------------------------------------------------------------------

    def sync(self, demand: dict[str, int], known_version: int, ingress_id: str | None = None,
             tenant_demand: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
        """Record an ingress's demand; return capacity, the ingress's share of it (from
        the tenants each ingress is serving, router/capacity_shares.py) and, if changed,
        the registry."""
        self._planner.record_demand(demand)
        kv_tokens, max_seqs = self._planner.capacity()
        state: dict[str, Any] = {
            "kv_tokens": kv_tokens,
            "max_seqs": max_seqs,
            # Each dedicated model's own replicas: requests for it are admitted there.
            "dedicated_capacity": {pool: list(c) for pool, c in
                                   self._planner.capacities().items() if pool is not None},
            "replicas": len(self._planner.replicas()),
            # A restarted controller has heard from no replica yet: an ingress that took
            # this count would admit nothing and fail its health check until the next
            # sync, so it keeps the capacity it knew (the engines did not go anywhere).
            "warming_up": time.monotonic() < self._reports_complete_at,
        }
        if ingress_id is not None:
            self._shares.update(ingress_id, tenant_demand or {})
            state["capacity_share"] = self._shares.share(ingress_id, kv_tokens, max_seqs)
        with self._registry_lock:
            state["version"] = self._registry.version
            if known_version != self._registry.version:
                state["adapters"] = self._registry.snapshot()
        # Printed here, not in `report`: the ingress that called learns the engines'
        # capacity from this answer, so requests are admitted from now on.
        ready = self._ready.line(self._planner.replicas())
        if ready:
            readiness.announce(logger, ready)
        return state

    # -- admin API (called by the ingress after it checked the token) --------------------

    def register_adapter(self, name: str, path: str) -> AdapterSpec | AdapterError:
        with self._registry_lock:
            return self._register(name, path)

    def unregister_adapter(self, name: str) -> AdapterSpec | AdapterError:
        with self._registry_lock:
            return self._unregister(name)

    def _register(self, name: str, path: str) -> AdapterSpec | AdapterError:
        try:
            spec = self._registry.register(name, path)
        except AdapterError as e:
            return e  # returned, not raised: it is an answer, not a controller failure
        failed = self._save(f"register {name}")
        if failed:
            # The name stays retired with these weights, which may register under it
            # again later; no other weights can (as if it had been deleted).
            self._registry.unregister(name)
            return failed
        logger.info("registered adapter %s from %s (rank %d)", name, spec.path, spec.rank)
        return spec

    def _unregister(self, name: str) -> AdapterSpec | AdapterError:
        try:
            spec = self._registry.unregister(name)
        except AdapterError as e:
            return e
        failed = self._save(f"delete {name}")
        if failed:
            try:
                self._registry.register(name, spec.path)
            except AdapterError:
                pass  # its directory went bad meanwhile: deleted it stays, and a restart
                # leaves it out too
            else:
                return failed
        self._planner.forget_adapter(name)
        return spec

    def _save(self, change: str) -> AdapterError | None:
        """Persist the registry; a change that could not be saved is undone and answered
        503, since a controller restart would otherwise silently revert it."""
        try:
            self._store.save(registry_state(self._registry))
        except OSError as e:
            logger.error("could not save the adapter registry to %s: %s", self._store.path, e)
            return AdapterError(503, f"could not {change}: the adapter registry could not "
                                "be saved; try again")
        return None

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
