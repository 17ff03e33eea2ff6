"""The engine replica: a Ray Serve deployment that owns one inference engine."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, AsyncIterator

from ray import serve

from deployments.protocol import Engine, ReplyHead
from router.hints import RoutingHints
from ruvllm.config import AppConfig, EngineConfig
from ruvllm.model_store import resolve_model

logger = logging.getLogger("ray.serve")


def cpu_engine_env(config: EngineConfig, local_rank: int, local_world_size: int) -> dict[str, str]:
    """Environment for vLLM's CPU backend in a replica that is `local_rank` of
    `local_world_size` replicas on this node."""
    env: dict[str, str] = {}
    if config.cpu_kvcache_space_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kvcache_space_gib)
    bind = config.cpu_threads_bind
    if isinstance(bind, list):
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind[local_rank % len(bind)]
    elif bind == "spread":
        cores = sorted(os.sched_getaffinity(0))
        share = max(1, len(cores) // max(1, local_world_size))
        start = (local_rank * share) % len(cores)
        mine = cores[start:start + share]
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in mine)
        # The worker's cores are spoken for; don't hold another back for the scheduler.
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    else:
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return env


def make_engine(config: AppConfig) -> Engine:
    model_path = resolve_model(config.model.source, config.resolved_cache_dir)
    if config.engine.kind == "vllm":
        from deployments.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, config.model.name, config.engine)
    raise ValueError(f"engine.kind {config.engine.kind!r} is not available")


class LLMReplica:
    """Serve replica around one engine. Registered as a deployment by the app builder."""

    async def __init__(self, config: AppConfig) -> None:
        context = serve.get_replica_context()
        self._replica_id = context.replica_tag
        rank = getattr(context, "rank", None)
        local_rank = getattr(rank, "local_rank", 0) or 0
        if config.replicas.num_gpus == 0:
            # Must be in place before vLLM spawns its engine-core process.
            os.environ.update(cpu_engine_env(config.engine, local_rank, _replicas_per_node(config)))
        self._engine = make_engine(config)
        await self._engine.start()

    async def chat(self, body: dict[str, Any], request_id: str,
                   hints: RoutingHints | None = None) -> AsyncIterator[ReplyHead | str]:
        async for item in self._tagged(self._engine.chat(body, request_id)):
            yield item

    async def completion(self, body: dict[str, Any], request_id: str,
                         hints: RoutingHints | None = None) -> AsyncIterator[ReplyHead | str]:
        async for item in self._tagged(self._engine.completion(body, request_id)):
            yield item

    async def _tagged(self, reply: AsyncIterator[ReplyHead | str]) -> AsyncIterator[ReplyHead | str]:
        async for item in reply:
            if isinstance(item, ReplyHead):
                item = dataclasses.replace(item, replica_id=self._replica_id)
            yield item

    def engine_stats(self, hints: RoutingHints | None = None) -> dict[str, Any]:
        stats = dataclasses.asdict(self._engine.stats())
        stats["replica_id"] = self._replica_id
        return stats

    def record_routing_stats(self) -> dict[str, Any]:
        # Serve calls this every request_routing_stats_period_s; routers read it.
        s = self._engine.stats()
        return {
            "running": s.running,
            "waiting": s.waiting,
            "kv_usage": s.kv_usage,
            "kv_capacity_tokens": s.kv_capacity_tokens,
            "max_num_seqs": s.max_num_seqs,
        }

    async def check_health(self) -> None:
        await self._engine.check_health()

    def __del__(self) -> None:
        # Stop the engine-core process with the replica instead of orphaning it.
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def _replicas_per_node(config: AppConfig) -> int:
    # Serve packs replicas onto nodes; on one node this is the replica count. The
    # ceiling of the autoscaling range is the safe bound for core splitting.
    if config.replicas.autoscaling is not None:
        return config.replicas.autoscaling.max_replicas
    return config.replicas.num_replicas
