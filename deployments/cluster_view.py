"""The ingress's cached view of the cluster, refreshed from the placement controller
off the request path: the adapter registry, the engines' capacity, and the adapter
demand this ingress has seen since its last sync."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from typing import Any, Callable

from ray.serve.handle import DeploymentHandle

from ruvllm.adapters.registry import AdapterSpec
from ruvllm.deployments.periodic import repeat_every


class ClusterView:
    def __init__(self, controller: DeploymentHandle, period_s: float,
                 on_capacity: Callable[[str | None, int, int], None],
                 tenant_demand: Callable[[], dict[str, tuple[int, int]]] | None = None) -> None:
        """`tenant_demand`: this ingress's admitted and waiting (KV tokens, sequences) per
        tenant, sent
        with each sync; the controller answers with `capacity_share`, this ingress's
        fraction of the engines' capacity (None until then, or without `tenant_demand`)."""
        self._controller = controller
        self._tenant_demand = tenant_demand
        self.ingress_id = uuid.uuid4().hex
        self.capacity_share: float | None = None
        self._period_s = period_s
        self._on_capacity = on_capacity
        self._demand: Counter[str] = Counter()
        self._version = -1
        self.adapters: dict[str, AdapterSpec] = {}
        self.replicas = 0
        self._task: asyncio.Task | None = None
        self._sync_lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            repeat_every(self._period_s, self.sync, "cluster view sync"))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def count_request(self, adapter: str) -> None:
        self._demand[adapter] += 1

    def add_adapter(self, spec: AdapterSpec) -> None:
        self.adapters = {**self.adapters, spec.name: spec}

    def drop_adapter(self, name: str) -> None:
        self.adapters = {k: v for k, v in self.adapters.items() if k != name}

    async def sync(self) -> None:
        async with self._sync_lock:
            demand, self._demand = self._demand, Counter()
            try:
                if self._tenant_demand is None:
                    state: dict[str, Any] = await self._controller.sync.remote(
                        dict(demand), self._version)
                else:
                    state = await self._controller.sync.remote(
                        dict(demand), self._version, self.ingress_id, self._tenant_demand())
            except Exception:
                self._demand.update(demand)  # report it next time
                raise
            if "adapters" in state:
                self.adapters = state["adapters"]
                self._version = state["version"]
            if state.get("warming_up"):
                return  # a restarted controller's partial count: keep the last one
            self.replicas = state["replicas"]
            self.capacity_share = state.get("capacity_share")
            self._on_capacity(None, state["kv_tokens"], state["max_seqs"])
            for model, (kv, seqs) in state.get("dedicated_capacity", {}).items():
                self._on_capacity(model, kv, seqs)

