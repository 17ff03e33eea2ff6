"""Ray Serve's high-throughput mode, which every deployment runs in (CPU and GPU).

Two Ray Serve 2.60 feature flags, read from the environment when the Ray cluster starts
(so `make serve` and the KubeRay manifests set them; a config file cannot):
RAY_SERVE_THROUGHPUT_OPTIMIZED (the ingress replica serves HTTP itself, replicas talk
gRPC, user code on the replica's own loop) and RAY_SERVE_ENABLE_HA_PROXY (HAProxy instead
of Serve's Python HTTP proxy in front of the ingress replicas).

Measured on an H200 with an 8B-shaped model (benchmarks/results/gpu_stack_vs_vllm), in
one run against bare vLLM: output throughput at concurrency 64 went from 0.37x bare in
the default mode to 0.99x, at 128 from 0.63x to 0.91x (0.92x and 1.00x in two runs of
12-01, and +3.8 ms to the first token at concurrency 1). In the default mode every SSE
chunk crossed two Python hops (replica -> ingress -> Serve's proxy), and at ~6,600 chunks
a second the ingress and the proxy processes were the busiest on the machine (245% and
118% CPU) while the engine waited.

On the 2-core CPU default the mode matters at concurrency 1: the stack's time to the
response headers over bare vLLM's was +25 to +41 ms in Serve's default mode (three runs,
benchmarks/results/serve_vs_vllm/repeats) and +4.5 to +9.0 ms in this mode (three runs,
benchmarks/results/ttft_breakdown): the Python proxy hop and the user-code threads are gone.
The CPU profile keeps Serve's console log on (CPU_FLAGS): the mode turns it off by default,
and on CPU its request lines are few.
"""

from __future__ import annotations

THROUGHPUT_FLAGS: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}

CPU_FLAGS: dict[str, str] = {**THROUGHPUT_FLAGS, "RAY_SERVE_LOG_TO_STDERR": "1"}

# Serve's default mode (its Python HTTP proxy), for benchmarks that compare the two.
DEFAULT_MODE_FLAGS: dict[str, str] = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
                                      "RAY_SERVE_ENABLE_HA_PROXY": "0"}


def flags_for(config_name: str) -> dict[str, str]:
    """The flags `make serve` exports for a config (the Makefile keys on "gpu" in its name)."""
    return THROUGHPUT_FLAGS if "gpu" in config_name else CPU_FLAGS

# Ports Serve 2.60 binds for itself in that mode (ray/serve/_private/constants.py): the
# HAProxy frontend listens on http_options.port, so that port must be none of these. A
# stack whose http port was 8500 failed to start on an H200 ("cannot bind socket ... for
# [0.0.0.0:8500]": its own fallback proxy held it).
HAPROXY_MODE_PORTS: dict[int, str] = {
    8404: "HAProxy stats (RAY_SERVE_HAPROXY_STATS_PORT)",
    8500: "Serve's fallback HTTP proxy (RAY_SERVE_FALLBACK_PROXY_HTTP_PORT)",
    9101: "HAProxy metrics (RAY_SERVE_HAPROXY_METRICS_PORT)",
    9500: "Serve's fallback gRPC proxy (RAY_SERVE_FALLBACK_PROXY_GRPC_PORT)",
}


def port_conflict(http_port: int) -> str | None:
    """Why `http_port` cannot be the HAProxy frontend's port in this mode, or None."""
    used = HAPROXY_MODE_PORTS.get(http_port)
    return (f"port {http_port} is taken by {used} in Ray Serve's high-throughput mode; "
            "choose another http_options.port") if used else None
