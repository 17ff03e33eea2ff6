"""The engine replica: a Ray Serve deployment that owns one inference engine."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from ruvllm.adapters.slots import AdapterSlots
from ruvllm.deployments.coalesce import coalesce_ready
from ruvllm.deployments.gpu_start_lock import gpu_start_lock
from ruvllm.deployments.periodic import repeat_every
from ruvllm.deployments.protocol import (Engine, EngineRequest, ReplyHead, engine_died_head,
                                          error_body)
from ruvllm.router.hints import RoutingHints
from ruvllm.router.metrics import AdapterMetrics
from ruvllm.adapters.placement import ReplicaReport
from ruvllm.config import AppConfig, EngineConfig, XLoraMixture
from ruvllm.model_store import resolve_model

logger = logging.getLogger("ray.serve")

# How often a replica checks that its engine's process is alive. A dead engine answers
# every request with an error at once, so while it sits in the candidate set a
# load-aware router prefers it (it looks idle); the check is one attribute read.
ENGINE_WATCH_PERIOD_S = 0.1


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


@dataclass(frozen=True)
class QuantizedServing:
    """A quantized variant of the base model: a checkpoint built by an ISQ job before the
    replicas (backend vllm), or the base checkpoint quantized by mistral.rs while it
    loads (`in_situ`), or a GGUF file mistral.rs serves as it is (`gguf_file`)."""

    name: str
    model_dir: str
    backend: str = "vllm"
    in_situ: str | None = None
    gguf_file: str | None = None


def make_engine(config: AppConfig, mixture: XLoraMixture | None = None,
                quantized: QuantizedServing | None = None, threads: int | None = None) -> Engine:
    backend = quantized.backend if quantized is not None else config.backend_of(mixture)
    if backend == "mistralrs":
        return _mistralrs_engine(config, quantized, threads)
    from ruvllm.deployments.vllm_engine import VLLMEngine

    if quantized is not None:
        # Adapters stay on the base deployment: this variant serves its own name only.
        engine = config.engine.model_copy(update={"enable_lora": False})
        return VLLMEngine(Path(quantized.model_dir), quantized.name, engine)
    if mixture is None:
        model_path = resolve_model(config.model.source, config.resolved_cache_dir)
        return VLLMEngine(model_path, config.model.name, config.engine)
    from ruvllm.adapters.xlora.checkpoint import mixture_model_dir

    # The experts live in the model itself; vLLM's own LoRA stays off. Non-granular
    # mode leaves the scaling pass's cache unfilled for generated tokens, so a prefix
    # cache hit on them would read garbage: it serves without prefix caching.
    # Granular mixtures compile like the base (both passes, the classifier and the mixing
    # in one traced forward): on an H200 under CUDA graphs they match peft as closely as
    # eager (max |log-prob difference| 0.18 in both modes) and decode at 0.60x the base at
    # batch 1. Non-granular decode-only steps skip the scaling pass and run their compiled
    # real pass inside a full graph (0.88x at batch 1); its steps with prompt tokens run
    # their scaling pass eagerly (benchmarks/results/gpu_decode).
    engine = config.engine.model_copy(update={
        "enable_lora": False,
        "enable_prefix_caching": config.engine.enable_prefix_caching and not mixture.non_granular,
    })
    return VLLMEngine(mixture_model_dir(mixture, config), mixture.name, engine)


def _mistralrs_engine(config: AppConfig, quantized: QuantizedServing | None,
                     threads: int | None) -> Engine:
    from ruvllm.deployments.mistralrs_engine import MistralRsEngine
    from ruvllm.deployments.mistralrs_model import MistralRsModel, readable_checkpoint

    base = resolve_model(config.model.source, config.resolved_cache_dir)
    if quantized is None:  # the base deployment: its LoRA adapters too (engine.enable_lora)
        model = MistralRsModel(base, readable_checkpoint(base, config.resolved_cache_dir))
        return MistralRsEngine(model, config.model.name, config.engine, threads)
    engine = config.engine_for(None).model_copy(update={"backend": "mistralrs",
                                                        "enable_lora": False})
    if quantized.gguf_file:
        model = MistralRsModel(base, gguf_file=Path(quantized.gguf_file))
    else:
        model = MistralRsModel(base, readable_checkpoint(Path(quantized.model_dir),
                                                         config.resolved_cache_dir),
                               in_situ=quantized.in_situ)
    return MistralRsEngine(model, quantized.name, engine, threads)


XLORA_SCALINGS_FIELD = "xlora_scalings"


def _expert_names(mixture: XLoraMixture, config: AppConfig) -> list[str] | None:
    """Experts named by their training domain where the checkpoint records it (the
    fixture's fixture.json), else by their peft names."""
    import json

    from ruvllm.adapters.xlora.checkpoint import mixture_checkpoint_dir

    meta = mixture_checkpoint_dir(mixture, config) / "fixture.json"
    if not meta.is_file():
        return None
    experts = json.loads(meta.read_text()).get("experts", {})
    return [f"{name}:{info.get('domain', name)}" for name, info in sorted(experts.items())]


class LLMReplica:
    """Serve replica around one engine. Registered as a deployment by the app builder."""

    async def __init__(self, config: AppConfig, controller: DeploymentHandle | None = None,
                       mixture: XLoraMixture | None = None,
                       quantized: QuantizedServing | None = None) -> None:
        context = serve.get_replica_context()
        self._replica_id = context.replica_tag
        rank = getattr(context, "rank", None)
        local_rank = getattr(rank, "local_rank", 0) or 0
        if config.replicas.num_gpus == 0:
            # Must be in place before vLLM spawns its engine-core process.
            os.environ.update(cpu_engine_env(config.engine, local_rank, _replicas_per_node(config)))
        self._config = config
        self._mixture = mixture
        # A dedicated model (X-LoRA mixture, quantized variant) is resident for good.
        self._dedicated = mixture.name if mixture else quantized.name if quantized else None
        self._engine = make_engine(config, mixture, quantized,
                                   threads=_core_share(config, _replicas_per_node(config)))
        async with gpu_start_lock(_gpu_ids()):
            await self._engine.start()
        slots = config.engine.max_cpu_loras or config.engine.max_loras
        self._slots = AdapterSlots(
            slots if config.engine.enable_lora and self._dedicated is None else 0)
        self._adapter_lock = asyncio.Lock()
        self._adapter_counts = {"loads": 0, "plan_loads": 0, "evictions": 0, "hits": 0}
        self._metrics = AdapterMetrics()
        self._controller = controller
        # The controller restarting must not stop serving: a failed report is retried.
        self._report_task = (asyncio.get_running_loop().create_task(repeat_every(
            config.placement.report_period_s, self._report_and_follow_plan, "placement report"))
                             if controller is not None else None)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_engine())

    # -- requests ------------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[ReplyHead | str]:
        """Serve one request the ingress parsed (the only request method)."""
        if self._engine.is_dead:  # the watcher is about to end this process
            yield dataclasses.replace(engine_died_head(), replica_id=self._replica_id)
            return
        method = self._engine.chat if request.kind == "chat" else self._engine.completion
        if request.xlora_scalings is not None:
            serving = self._serve_with_scalings(method, request)
        else:
            serving = self._serve(method, request.request, request.request_id, request.hints)
        async for item in serving:
            yield item

    async def _serve(self, method: Any, request: Any, request_id: str,
                     hints: RoutingHints | None) -> AsyncIterator[ReplyHead | str]:
        started = time.perf_counter()
        adapter = hints.adapter if hints is not None else None
        if adapter is not None:
            # Held before loading, so a concurrent load elsewhere never evicts it.
            self._slots.acquire(adapter)
        try:
            if adapter is not None:
                try:
                    await self._ensure_adapter(adapter, hints.adapter_path, cause="request")
                except Exception as e:  # a broken adapter fails its request, not the replica
                    logger.warning("adapter %s failed to load: %s", adapter, e)
                    yield ReplyHead(422, error_body(
                        422, f"adapter {adapter!r} could not be loaded: {e}"),
                        replica_id=self._replica_id)
                    return
            reply = method(request, request_id)
            head = await anext(reply)
            yield dataclasses.replace(head, replica_id=self._replica_id,
                                      prepare_s=time.perf_counter() - started)
            if head.is_stream:
                async for chunk in coalesce_ready(reply):
                    yield chunk
            else:
                await reply.aclose()
        finally:
            if adapter is not None:
                self._slots.release(adapter)

    async def _serve_with_scalings(self, method: Any,
                                   envelope: EngineRequest) -> AsyncIterator[ReplyHead | str]:
        """A mixture request asking for its per-token expert weights (debugging)."""
        option, request = envelope.xlora_scalings, envelope.request
        problem = None
        if self._mixture is None:
            problem = "is only available for X-LoRA mixture models"
        elif request.stream:
            problem = "is only available without streaming"
        elif option not in (True, False, "per_module"):
            problem = "must be true, false or \"per_module\""
        elif (request.n or 1) != 1:
            problem = "needs n = 1"
        if problem:
            yield ReplyHead(400, error_body(400, f"{XLORA_SCALINGS_FIELD} {problem}",
                                            param=XLORA_SCALINGS_FIELD),
                            replica_id=self._replica_id)
            return
        if option is False:
            async for item in self._serve(method, request, envelope.request_id, None):
                yield item
            return
        wanted_ids = bool(getattr(request, "return_token_ids", False))
        request = request.model_copy(update={"return_token_ids": True})
        async for item in self._serve(method, request, envelope.request_id, None):
            if isinstance(item, ReplyHead) and item.status == 200 and isinstance(item.body, dict):
                reply = item.body
                choice = reply["choices"][0]
                prompt_ids = reply.get("prompt_token_ids") or choice.get("prompt_token_ids") or []
                explainer = await self._scalings_explainer()
                reply[XLORA_SCALINGS_FIELD] = await asyncio.to_thread(
                    explainer.explain, list(prompt_ids), list(choice.get("token_ids") or []),
                    option == "per_module")
                if not wanted_ids:
                    reply.pop("prompt_token_ids", None)
                    for c in reply["choices"]:
                        c.pop("token_ids", None)
                        c.pop("prompt_token_ids", None)
            yield item

    async def _scalings_explainer(self) -> Any:
        if getattr(self, "_explainer", None) is None:
            from ruvllm.adapters.xlora.checkpoint import mixture_model_dir
            from ruvllm.adapters.xlora.explain import ScalingsExplainer

            model_dir = mixture_model_dir(self._mixture, self._config)
            self._explainer = await asyncio.to_thread(ScalingsExplainer, model_dir,
                                                      _expert_names(self._mixture, self._config))
        return self._explainer

    # -- adapters ------------------------------------------------------------------------

    async def _ensure_adapter(self, name: str, path: str | None, cause: str) -> None:
        if name in self._slots:
            self._slots.touch(name)
            if cause == "request":
                self._count("hits")
            return
        if path is None:
            raise ValueError("no path given for a non-resident adapter")
        async with self._adapter_lock:
            if name in self._slots:
                return
            # Loaded before anything is evicted: an adapter that cannot load (its files
            # broken since registration) fails its own request and evicts nobody. The
            # engine has room for one adapter beyond the slots (VLLMEngine's spare CPU
            # slot, mistral.rs's twice the slots), as vLLM's own worker loads first too.
            await self._engine.load_adapter(name, path)
            victims = self._slots.victims_for_one_more()
            self._slots.add(name)
            for victim in victims:
                if not self._slots.is_idle(victim):
                    continue  # picked up by a request while we were unloading another
                # Out of the resident set before the unload yields: a request for it that
                # arrives meanwhile must wait for this lock and load it again, not find it
                # "resident" and reach vLLM after the unload (a 404 for a valid adapter).
                self._slots.remove(victim)
                await self._engine.unload_adapter(victim)
                self._count("evictions")
            if cause == "plan":
                # The plan sends an adapter in demand elsewhere: credit it one request so
                # the next rarely used adapter does not evict it before its traffic comes.
                self._slots.note_demand(name)
            self._count("loads", cause)
            self._metrics.resident.set(len(self._slots.resident()))

    def _count(self, what: str, cause: str | None = None) -> None:
        self._adapter_counts[what] += 1
        if what == "loads":
            if cause == "plan":
                self._adapter_counts["plan_loads"] += 1
            self._metrics.loads.inc(tags={"cause": cause or "request"})
        elif what == "evictions":
            self._metrics.evictions.inc()
        else:
            self._metrics.hits.inc()

    async def _report_and_follow_plan(self) -> None:
        plan = await self._controller.report.remote(self._report())
        for adapter, path in plan.load:
            await self._ensure_adapter(adapter, path, cause="plan")

    def _report(self) -> ReplicaReport:
        s = self._engine.stats()
        resident = [self._dedicated] if self._dedicated else self._slots.resident()
        return ReplicaReport(
            replica_id=self._replica_id, resident=resident,
            slots=self._slots.capacity, queued_tokens=s.kv_usage * s.kv_capacity_tokens,
            kv_capacity_tokens=s.kv_capacity_tokens, max_num_seqs=s.max_num_seqs,
            running=s.running, waiting=s.waiting, prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits, dedicated=self._dedicated,
            reported_at=time.time(), engine={**dataclasses.asdict(s), "gpu_ids": _gpu_ids()},
            **self._adapter_counts)

    async def _watch_engine(self) -> None:
        """Exit the replica's process once its engine has died, after telling the routers.
        vLLM cannot restart its engine core in place (its own API server exits on
        EngineDeadError too). A dead actor is what Serve handles best: routers drop it on
        their next call (ActorDiedError), in-flight requests end with the ingress's 503,
        and Serve starts a new replica. But Ray sees the process gone only once the kernel
        has torn it down, like the engine core's (2.7 s in the fault test after an
        immediate exit, 0.4 s on a quieter run), and meanwhile routers kept choosing it.
        So the replica first stays up `stats_period_s` x 2, saying in its routing stats
        that its engine is dead: Serve pulls them every period and pushes them to every
        router, which leaves the replica out from then on; requests reaching it before
        get a 503 the ingress sends elsewhere."""
        while not self._engine.is_dead:
            await asyncio.sleep(ENGINE_WATCH_PERIOD_S)
        logger.error("replica %s: its engine process died; exiting so that Serve "
                     "replaces this replica", self._replica_id)
        await asyncio.sleep(2 * self._config.router.stats_period_s)
        logging.shutdown()
        os._exit(1)

    # -- routers and Serve ----------------------------------------------------------------

    def record_routing_stats(self) -> dict[str, Any]:
        # Serve calls this every request_routing_stats_period_s; routers read it.
        s = self._engine.stats()
        return {
            "running": s.running,
            "waiting": s.waiting,
            "kv_usage": s.kv_usage,
            "kv_capacity_tokens": s.kv_capacity_tokens,
            "max_num_seqs": s.max_num_seqs,
            "adapters": self._slots.resident(),
            "adapter_slots_free": self._slots.free,
            # Routers leave such a replica out (router/placement_router.py).
            "engine_dead": self._engine.is_dead,
        }

    async def check_health(self) -> None:
        await self._engine.check_health()

    def __del__(self) -> None:
        # Stop the engine-core process with the replica instead of orphaning it.
        for name in ("_report_task", "_watch_task"):
            task = getattr(self, name, None)
            if task is not None:
                task.cancel()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def _gpu_ids() -> list[str]:
    """The GPUs Ray gave this replica (empty on CPU): which card serves what."""
    import ray

    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def _core_share(config: AppConfig, replicas: int) -> int:
    """mistral.rs's compute threads: engine.mistralrs.threads, else an equal share of
    this node's cores (what cpu_threads_bind: spread gives a vLLM replica)."""
    if config.engine.mistralrs.threads:
        return config.engine.mistralrs.threads
    return max(1, len(os.sched_getaffinity(0)) // max(1, replicas))


def _replicas_per_node(config: AppConfig) -> int:
    # Serve packs replicas onto nodes; on one node this is the replica count. The
    # ceiling of the autoscaling range is the safe bound for core splitting.
    if config.replicas.autoscaling is not None:
        return config.replicas.autoscaling.max_replicas
    return config.replicas.num_replicas
