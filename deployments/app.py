"""The application builder that `serve run cluster.yaml` imports.

`import_path: ruvllm.deployments.app:build_app` with the ruvllm config as `args`. The config is
validated here, once; a bad field fails the build with its path in the message.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig
from ray.serve.config import RequestRouterConfig
from ray.serve.schema import LoggingConfig

from ruvllm.adapters.registry import AdapterError
from ruvllm.deployments.controller import PlacementController, make_registry
from ruvllm.deployments.ingress import ingress_deployment
from ruvllm.deployments.replica import LLMReplica, QuantizedServing
from ruvllm.config import AppConfig, ConfigError, QuantizedModel, ReplicaConfig, XLoraMixture
from ruvllm.model_store import resolve_model

logger = logging.getLogger("ray.serve")

ROUTER_CLASSES = {
    "placement_aware": "ruvllm.router.placement_router:PlacementAwareRouter",
    "round_robin": "ruvllm.router.placement_router:RoundRobinRouter",
    "power_of_two": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
}


def _router_config(config: AppConfig) -> RequestRouterConfig:
    r = config.router
    kwargs = {}
    if r.policy == "placement_aware":
        kwargs = {
            "ledger_ttl_s": 1.5 * config.ingress.request_timeout_s,
            "session_affinity": r.session_affinity,
            "prefix_affinity": r.prefix_affinity,
            "max_imbalance_tokens": r.max_imbalance_tokens,
            "prefix_imbalance_per_token": r.prefix_imbalance_per_token,
            "cold_adapter_penalty_tokens": r.cold_adapter_penalty_tokens,
            "affinity_headroom": r.affinity_headroom,
            "affinity_table_size": r.affinity_table_size,
        }
    return RequestRouterConfig(
        request_router_class=ROUTER_CLASSES[r.policy],
        request_routing_stats_period_s=r.stats_period_s,
        request_routing_stats_timeout_s=max(5.0, 5 * r.stats_period_s),
        request_router_kwargs=kwargs,
    )


# How often Serve's controller asks each engine replica whether it is alive. A replica whose
# engine process died exits within ~0.1 s of the kill (deployments/replica.py), but Serve
# drops a dead actor from every router's choice only when a health check fails (routing
# stats that fail to arrive are only logged): at Serve's default 10 s the routers kept
# choosing the dead replica for up to 10 s. The check is one cheap actor call.
ENGINE_HEALTH_CHECK_PERIOD_S = 1.0

# Past its deadline the ingress has answered (504, or an error event) and aborted the
# engine request; the margin lets that answer go out before Serve stops the actor.
SHUTDOWN_GRACE_MARGIN_S = 10.0


def shutdown_grace_s(config: AppConfig) -> float:
    """How long Serve lets a replica (engine or ingress) being scaled down or replaced
    finish its requests before killing it. Serve's default, 30 s (this file's value
    before), cut streams that `ingress.request_timeout_s` (600 s) allows to run on."""
    return config.ingress.request_timeout_s + SHUTDOWN_GRACE_MARGIN_S


def _replica_env(config: AppConfig, r: ReplicaConfig) -> dict[str, str]:
    """The replica's own `env` and what the engine settings need in its environment."""
    kernel = config.engine.w4a16_kernel
    if kernel == "auto":
        return dict(r.env)
    if "VLLM_DISABLED_KERNELS" in r.env:
        raise ConfigError("engine.w4a16_kernel and a replicas env VLLM_DISABLED_KERNELS both "
                          "pick vLLM's kernels; keep one")
    from ruvllm.deployments.vllm_engine import w4a16_kernel_env

    return {**r.env, **w4a16_kernel_env(kernel)}


def _replica_options(config: AppConfig, r: ReplicaConfig | None = None,
                     name: str = "LLMReplica") -> dict[str, Any]:
    r = r or config.replicas
    options: dict[str, Any] = {
        "name": name,
        "max_ongoing_requests": r.max_ongoing_requests,
        "ray_actor_options": {
            "num_cpus": r.num_cpus,
            "num_gpus": r.num_gpus,
            **({"runtime_env": {"env_vars": env}} if (env := _replica_env(config, r)) else {}),
        },
        "request_router_config": _router_config(config),
        # Engines take a minute to compile; don't let Serve give up on them.
        "health_check_timeout_s": 60,
        "health_check_period_s": ENGINE_HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_timeout_s": shutdown_grace_s(config),
        # A replica that cannot start its engine will not start on retry 20 either;
        # fail the deployment quickly with the engine's error instead.
        "max_constructor_retry_count": 3,
    }
    if r.autoscaling is not None:
        a = r.autoscaling
        options["autoscaling_config"] = ServeAutoscalingConfig(
            min_replicas=a.min_replicas,
            max_replicas=a.max_replicas,
            initial_replicas=a.initial_replicas,
            target_ongoing_requests=a.target_ongoing_requests,
            upscale_delay_s=a.upscale_delay_s,
            downscale_delay_s=a.downscale_delay_s,
        )
    else:
        options["num_replicas"] = r.num_replicas
    return options


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    config = AppConfig.from_args(args)
    try:
        model_path = resolve_model(config.model.source, config.resolved_cache_dir)
    except (FileNotFoundError, KeyError) as e:
        raise ConfigError(f"model.source: {e}") from None
    if config.engine.backend == "vllm":
        from ruvllm.deployments.vllm_engine import check_engine_args

        check_engine_args(model_path, config.model.name, config.engine)
    try:
        adapters = make_registry(config).snapshot()
    except AdapterError as e:
        raise ConfigError(f"adapters.declared: {e.message}") from None
    logger.info("ruvllm app %r: model %s at %s, %d declared adapter(s)", config.name,
                config.model.name, model_path, len(adapters))

    controller = serve.deployment(PlacementController).options(
        name="PlacementController", num_replicas=1, max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": 0},
        # Serve notices a dead replica at its next health check (default every 10 s):
        # the controller is one cheap actor, so check it often and replace it sooner.
        health_check_period_s=2,
        # Every engine replica reports and every ingress syncs once a second: Serve's
        # access log line per call was a console line per second per replica on an idle
        # app (1,743 in 17 minutes). Its own log lines (adapters, ready) still print.
        logging_config=LoggingConfig(enable_access_log=False),
    ).bind(config)
    replica = serve.deployment(LLMReplica).options(**_replica_options(config)).bind(
        config, controller)
    # Models with deployments of their own: name -> (handle, checkpoint shown in /v1/models).
    dedicated = {}
    for mixture in config.xlora:
        _check_mixture(mixture, config)
        dedicated[mixture.name] = (serve.deployment(LLMReplica).options(
            **_replica_options(config, mixture.replicas, f"XLoRA-{mixture.name}"),
        ).bind(config, controller, mixture), mixture.checkpoint)
    for variant in config.quantized:
        serving = _quantized_serving(variant, model_path, config)
        dedicated[variant.name] = (serve.deployment(LLMReplica).options(
            **_replica_options(config, variant.replicas, f"ISQ-{variant.name}"),
        ).bind(config, controller, None, serving), serving.gguf_file or serving.model_dir)
    ingress = ingress_deployment().options(**_ingress_options(config))
    return ingress.bind(replica, controller, config, dedicated)


def _ingress_options(config: AppConfig) -> dict[str, Any]:
    return {
        "name": "OpenAIIngress",
        "num_replicas": config.ingress.num_replicas,
        "max_ongoing_requests": config.ingress.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.ingress.num_cpus},
        # It relays the streams: scaling it down must not cut them either.
        "graceful_shutdown_timeout_s": shutdown_grace_s(config),
    }


def _quantized_serving(variant: QuantizedModel, model_path: Any,
                       config: AppConfig) -> QuantizedServing:
    """vLLM variants get their toolkit job's checkpoint; mistral.rs variants quantize
    while loading (or read the builtin GGUF), so nothing runs before their replicas."""
    if config.backend_of(variant) == "vllm":
        return QuantizedServing(variant.name, str(_quantize(variant, model_path, config)))
    gguf = None
    if variant.isq.gguf:
        from ruvllm.model_store import BUILTIN_MODELS

        gguf = str(BUILTIN_MODELS[config.model.source.split(":", 1)[1]].locate())
    # mistral.rs exposes no prompt log-probabilities, so the held-out perplexity gate
    # cannot be measured through it (README "ISQ"); the variant is served ungated.
    logger.info("quantized.%s: %s by mistral.rs at load (no quality gate)", variant.name,
                variant.isq.describe())
    return QuantizedServing(variant.name, str(model_path), backend="mistralrs",
                            in_situ=variant.isq.in_situ, gguf_file=gguf)


def _quantize(variant: QuantizedModel, model_path: Any, config: AppConfig) -> Any:
    """Run the variant's ISQ job as a Ray task and wait for it, so its replicas start on
    the quantized checkpoint; a cached result returns at once. Any failure (quality
    gate, toolkit, timeout) fails the build with the variant's field path."""
    from ruvllm.isq.job import IsqQualityError, quantize_on_ray
    from ruvllm.isq.serving import serving_problem

    where = f"quantized.{variant.name}.isq"
    on_gpu = variant.replicas.num_gpus > 0
    problem = serving_problem(variant.isq, on_gpu)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    logger.info("%s: %s job for %s (progress in the job's log)", where,
                variant.isq.describe(), config.model.name)
    try:
        result = quantize_on_ray(model_path, config.model.name, variant.isq,
                                 config.resolved_cache_dir, use_gpu=on_gpu)
    except IsqQualityError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (RuntimeError, TimeoutError, OSError, ValueError) as e:
        raise ConfigError(f"{where}: the quantization job failed: {e}") from None
    logger.info("%s: %s checkpoint at %s (%s)", where, variant.isq.describe(), result.path,
                "cached" if result.reused else "built")
    return result.path


def _check_mixture(mixture: XLoraMixture, config: AppConfig) -> None:
    from ruvllm.adapters.xlora.checkpoint import read_checkpoint

    if mixture.checkpoint == "builtin:fixture":
        return  # built (and checked) by the replica on first start
    try:
        read_checkpoint(mixture.checkpoint, num_layers=1)
    except (AdapterError, OSError, KeyError, ValueError) as e:
        message = getattr(e, "message", str(e))
        raise ConfigError(f"xlora.{mixture.name}.checkpoint: {message}") from None
