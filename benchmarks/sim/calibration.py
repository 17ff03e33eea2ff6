"""Engine profiles for the cluster simulator, each number with where it came from.

The GPU figures are this project's own runs on lent machines (vLLM 0.26.0, random-weight
Llama-3-8B shape, bf16, FA3), copied here from the lead's shared notes
(`shared/gpu/README.md`, `shared/gpu/results-h100-2026-11-24.json`) because a user's clone
has no ../shared. The CPU profile is one vLLM-CPU engine measured alone on this 2-core
machine, its 2 cores shared with the serving stack's measured work (see CPU_SMOLLM2,
benchmarks/sim/cores.py, and `benchmarks/sim/fit_cpu_step.py`, which recomputes both). Anything not measured
is marked `derived` with its arithmetic; replace it with your own measurement when you
have one (every field is a plain number, overridable from the command line as JSON).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from benchmarks.sim.cores import SharedCores


@dataclass(frozen=True)
class EngineProfile:
    name: str
    # Decode step time = base + per_seq x batch + per_ctx_token x tokens in the batch's
    # contexts; prefill chunks add chunk / prefill_tokens_per_s to a step.
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_ctx_token_s: float
    prefill_tokens_per_s: float
    kv_tokens: int  # KV cache per replica, tokens
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_loras: int  # distinct adapters in one batch
    adapter_slots: int  # adapters resident per replica (max_cpu_loras)
    lora_load_s: float  # loading one adapter stalls the engine this long
    max_ongoing_requests: int  # Serve's per-replica cap (requests beyond wait in the handle)
    sources: dict[str, str] = field(default_factory=dict)
    # Engines sharing a machine's cores with the serving stack (cores.py); None: every
    # engine has its hardware to itself and the step times above are the whole story.
    shared_cores: SharedCores | None = None
    # New prompts wait for the running step to end and are prefilled together in the next
    # one, first tokens at its end (engine.py); False: fluid prefill (the H200 profile,
    # whose report predates the measurement and must not move).
    step_aligned_prefill: bool = False
    # With step_aligned_prefill: an adapter load or unload waits for the running step to
    # end (vLLM's engine core takes such calls between steps), then stalls lora_load_s
    # (a load) or nothing (an unload); the request behind it waits for both.
    adapter_calls_between_steps: bool = False

    def step_s(self, batch: int, ctx_tokens: int, prefill_tokens: int) -> float:
        return (self.decode_base_s + self.decode_per_seq_s * batch
                + self.decode_per_ctx_token_s * ctx_tokens
                + prefill_tokens / self.prefill_tokens_per_s)

    def as_dict(self) -> dict:
        out = asdict(self)
        if self.shared_cores is None:
            del out["shared_cores"]
        return out


# Measured figures the profiles are fitted to (copied from shared/gpu, see module doc).
H100_MEASURED = {
    "source": "shared/gpu/results-h100-2026-11-24.json (H100 80GB HBM3, vLLM 0.26.0, "
              "random-weight Llama-3-8B shape, bf16, offline LLM.generate)",
    "bs1_512in_256out_wall_s": 1.688,
    "bs64_512in_256out_wall_s": 3.03,
    "noprefix16x1088_prefill_wall_s": 0.432,
    "prefix16x1088_warm_prefill_wall_s": 0.086,  # 16,384 of 17,408 tokens cached
    "serve_512in_256out_c64_tpot_ms": 10,
    "serve_512in_256out_c64_ttft_p99_ms": 800,
}
H200_MEASURED = {
    "source": "shared/gpu/README.md, H200 2026-11-30, vLLM 0.26.0 OpenAI server, Llama-3-8B "
              "shape, --enable-lora --max-loras 4 --max-lora-rank 16 --block-size 16 "
              "--max-num-seqs 256 --gpu-memory-utilization 0.85, 512 in / 256 out",
    "c1_tpot_ms": 4.9,
    "c1_ttft_p50_ms": 54,
    "c64_out_tok_s": 6424,
    "c64_ttft_p50_ms": 502,
    "c64_ttft_p99_ms": 790,
    "kv_tokens": 844_208,
}

# Prefill: (17,408 - 1,024) uncached tokens in 0.432 - 0.086 s (the warm run's 0.086 s is
# the fixed cost of a generate call with 1,024 uncached tokens), H100 = 47,350 tok/s;
# prefill is compute-bound and the H200 has the H100's compute, so the same rate.
_PREFILL = (17_408 - 1_024) / (0.432 - 0.086)
# Attention reads each context token's K and V once per step: 32 layers x 8 KV heads x 128
# x 2 (K, V) x 2 bytes = 131,072 bytes; at the 73% of HBM bandwidth the H100's batch-1 run
# reached (README) that is 131,072 / (0.73 x 3.35e12) s per token on an H100 and
# 131,072 / (0.73 x 4.8e12) on an H200 (derived from measured efficiency + datasheet).
_KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2

H200_8B = EngineProfile(
    name="h200-llama3-8b",
    decode_base_s=0.0049,  # measured c=1 TPOT 4.9 ms
    # fit: with base and per-token fixed, the measured c=64 rate (6,424 tok/s = 9.96 ms per
    # step, each step also carrying 64 x 512 / 256 = 128 prefill tokens) leaves 0.83 ms
    # for 64 sequences' per-sequence work.
    decode_per_seq_s=1.3e-5,
    decode_per_ctx_token_s=_KV_BYTES_PER_TOKEN / (0.73 * 4.8e12),
    prefill_tokens_per_s=_PREFILL,
    kv_tokens=844_208,  # measured at gpu_memory_utilization 0.85
    block_size=16,
    max_num_seqs=64,  # k8s/overlays/gpu
    max_num_batched_tokens=8192,
    max_loras=16,
    adapter_slots=32,
    # derived: a rank-16 all-linear LoRA of an 8B Llama is 32 x 16 x (2x4096 + 2x(4096+1024)
    # + 3x(4096+14336)) x 2 bytes = 84 MB; read at 1 GB/s plus ~50 ms of vLLM set-up.
    lora_load_s=0.134,
    max_ongoing_requests=256,  # k8s/overlays/gpu
    sources={
        "decode_base_s": "H200 measured c=1 TPOT 4.9 ms",
        "decode_per_ctx_token_s": "derived: 131,072 KV bytes/token at 73% of 4.8 TB/s "
                                  "(73% = H100 measured batch-1 efficiency)",
        "prefill_tokens_per_s": "H100 measured: 16,384 uncached tokens in 0.346 s",
        "kv_tokens": "H200 measured, 844,208 KV tokens",
        "max_num_seqs, max_ongoing_requests, block_size": "k8s/overlays/gpu/rayservice.yaml",
        "max_loras, adapter_slots": "assumed for a GPU with host memory to spare "
                                    "(the overlay's 4/8 cannot hold 1,000 adapters on 64 "
                                    "replicas); swept in the report",
        "lora_load_s": "derived, not measured: 84 MB adapter at 1 GB/s + 50 ms",
        "decode_per_seq_s": "fitted to H200 measured c=64 6,424 tok/s (512 in / 256 out)",
        "step_aligned_prefill, adapter_calls_between_steps": "off: not measured on a GPU "
            "(measured on vLLM-CPU, 2026-12-01, the CPU profile); the scale sections keep "
            "the fluid prefill they were run with",
    },
)

# The CPU router benchmark's machine: 2 shared cores, smollm2-135m float32, 2 replicas,
# each engine's worker bound to one core. Measured 2026-12-01, not fitted to goodput:
# - the engine alone (benchmarks/results/sim/cpu_engine, `python -m benchmarks.sim.
#   cpu_engine_probe --max-loras 4`, 04:27-04:36 UTC): the lines of `fit_cpu_step.
#   engine_alone` through its batch sweep and its `add_lora` times (CPU_ENGINE_ALONE);
#   the simulated engine on that profile reproduces the probe's own closed loop (one
#   engine, 8 clients, router_bench's first 120 picks): 0.75 vs 0.72 req/s, decode
#   interval 438 vs 450 ms (fit_cpu_step `check`);
# - inside the stack (router_bench, power_of_two, max_loras 4, 03:53-04:01 UTC,
#   benchmarks/results/router/max_loras): the decode interval was 591 ms where the
#   engine alone, same max_loras and 8 clients per engine, showed 450 ms
#   (CPU_STACK_STRETCH). Two engines, Serve's processes and the load client share the 2
#   cores: the engine times below are the engine-alone ones, and the stack's work is
#   modelled as CPU per running sequence per step shared over the cores with the engines
#   (cores.py; an engine whose neighbour is idle steps at its engine-alone speed). That
#   one number, CPU_STACK_OVERHEAD_PER_SEQ_S, is where the simulated router_bench shows
#   the measured 1.31 stretch over the simulated engine alone (fit_cpu_step
#   `shared_cores`). Check, the max_loras 8 run (04:07-04:15 UTC, stretch 1.89 = 768 /
#   406 ms): simulated decode interval 703 ms against the measured 768 (-8%).
# The adapter-load counts and the goodputs are not fitted: they are the validation
# (benchmarks/results/sim/report.md).
CPU_ENGINE_ALONE = {
    "decode_base_s": 0.2157,  # step = 215.7 ms + 14.24 ms x sequences (on adapters)
    "decode_per_seq_s": 0.01424,
    "prefill_tokens_per_s": 83.76,  # 40-token prompts: +0.478 s per sequence to first token
    "lora_load_s": 0.0249,  # add_lora median, 9 adapters (24-33 ms)
}
# How vLLM-CPU schedules a new prompt against a running batch: its own step log
# (iteration details), one engine alone, `cpu_engine_probe --arrivals`, 2026-12-01
# 08:48-08:53 UTC, benchmarks/results/sim/cpu_engine/report.json ("arrivals"). Each
# of the 62 prompts arriving at a running batch (1-8 sequences + earlier arrivals) was
# prefilled in the step after the running one, beside the decoding batch, first token at
# that step's end (the 2 arriving at an idle engine: in the first step); prompts
# arriving together shared one step. Model time per step, least squares over all 345 /
# 394 steps: 170 / 150 ms + 5.0 / 7.7 ms per decoding sequence + 7.0 / 6.5 ms per prompt
# token (max_loras 8 / 4). The engine was ~1.6x faster then than in the 04:27 sweep (b=8
# decode step 207-228 vs 340 ms; load average 1.3-2.1 vs 1.9-2.9), so only the structure
# is taken from it (`step_aligned_prefill`); the prompt cost relative to the decode step
# (7 ms / 210 ms at b=8) x the sweep's 330 ms gives 11 ms per token, against the profile's
# 12 ms (0.478 s per 40 tokens): kept.
CPU_STEP_LOG = {
    "steps_to_first_token_at_running_batch": 2,  # the running step, then its own
    "prompt_token_model_s": (0.00704, 0.00654),  # max_loras 8, 4
    "decode_step_b8_model_s": (0.2071, 0.2280),
}
CPU_STACK_STRETCH = 1.3126  # 590.5 / 449.9 ms decode interval, stack / engine alone
CPU_STACK_OVERHEAD_PER_SEQ_S = 0.01885  # fit_cpu_step: the stretch above, simulated (step-aligned prefill and adapter calls; 0.01936 with fluid prefill)

CPU_SMOLLM2 = EngineProfile(
    name="cpu-2core-smollm2-135m",
    decode_base_s=CPU_ENGINE_ALONE["decode_base_s"],
    decode_per_seq_s=CPU_ENGINE_ALONE["decode_per_seq_s"],
    decode_per_ctx_token_s=0.0,
    prefill_tokens_per_s=CPU_ENGINE_ALONE["prefill_tokens_per_s"],
    kv_tokens=23_296,  # README: 1 GiB per replica = 23,296 tokens
    block_size=32,
    max_num_seqs=64,
    max_num_batched_tokens=2048,
    max_loras=4,
    adapter_slots=8,  # cluster.yaml max_cpu_loras
    lora_load_s=CPU_ENGINE_ALONE["lora_load_s"],
    max_ongoing_requests=256,
    step_aligned_prefill=True,
    adapter_calls_between_steps=True,
    sources={"adapter_calls_between_steps": "measured: the replica's load path (the "
                                            "project's VLLMEngine load_adapter / "
                                            "unload_adapter), engine alone, 2026-12-01 "
                                            "09:10-09:11 UTC, benchmarks/results/sim/"
                                            "cpu_engine (--load-path): idle load 32 ms "
                                            "(26-37), unload 3 ms; with 8 sequences "
                                            "decoding load 197 ms, unload 181 ms (one step "
                                            "each, decode step ~200 ms then)","step_aligned_prefill": "measured: vLLM-CPU's own step log (iteration details), "
                                     "one engine alone, 2026-12-01 08:48-08:53 UTC, "
                                     "benchmarks/results/sim/cpu_engine (--arrivals): every "
                                     "new request's prompt went into the step after the one "
                                     "running when it arrived (steps to first token 2; 1 on "
                                     "an idle engine), all waiting prompts in one step beside "
                                     "the decoding batch (chunked prefill on, 2048-token "
                                     "budget), first tokens at that step's end",
             "decode_base_s, decode_per_seq_s": "measured: one vLLM-CPU engine alone, batch "
                                                "sweep 1-16 sequences on adapters (benchmarks/"
                                                "results/sim/cpu_engine, 2026-12-01 04:27 UTC)",
             "prefill_tokens_per_s": "measured: the same sweep's slowest first token, "
                                     "+0.478 s per 40-token sequence",
             "lora_load_s": "measured: add_lora of an adapter not in the engine's CPU cache, "
                            "median 24.9 ms (taken at the core's share when it runs)",
             "shared_cores": "2 cores, one per engine, shared with the stack's work: 18.9 ms "
                             "per running sequence per step, where the simulated router_bench "
                             "(power_of_two, max_loras 4) shows the measured stretch 1.31 = "
                             "decode interval 591 ms (benchmarks/results/router/max_loras, "
                             "2026-12-01 03:53 UTC) / the engine alone's 450 ms in the same "
                             "closed loop (8 clients, same picks); fit_cpu_step",
             "kv_tokens, adapter_slots": "README (1 GiB = 23,296 tokens), cluster.yaml"},
    shared_cores=SharedCores(
        cores=2, overhead_per_step_s=0.0, overhead_per_seq_s=CPU_STACK_OVERHEAD_PER_SEQ_S,
        sources={"cores": "router_bench's machine: 2 cores, `cpu_threads_bind: spread`",
                 "overhead_per_seq_s": "fit_cpu_step `shared_cores`: the measured stack "
                                       "stretch 1.31 (router_bench max_loras 4 / "
                                       "cpu_engine_probe, decode intervals)",
                 "overhead_per_step_s": "0: per step instead of per sequence, fitted the "
                                        "same way (120 ms), it predicts the max_loras 8 "
                                        "decode interval 669 ms against the measured 768; "
                                        "per sequence, 703"}),
)

PROFILES = {p.name: p for p in (H200_8B, CPU_SMOLLM2)}
