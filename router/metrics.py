"""Router, admission and placement metrics, exported through Ray's metrics agent
(Prometheus format; visible in the Ray dashboard). Names are prefixed `ruvllm_`."""

from __future__ import annotations

from functools import cached_property

from ray.util import metrics

LATENCY_BUCKETS_S = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1]
WAIT_BUCKETS_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class RouterMetrics:
    @cached_property
    def decisions(self) -> metrics.Counter:
        return metrics.Counter("ruvllm_routing_decisions", "Routing decisions by reason.",
                               tag_keys=("reason",))

    @cached_property
    def decision_seconds(self) -> metrics.Histogram:
        return metrics.Histogram("ruvllm_routing_decision_seconds",
                                 "Time to rank replicas for one request.",
                                 boundaries=LATENCY_BUCKETS_S)


class AdmissionMetrics:
    @cached_property
    def admitted(self) -> metrics.Counter:
        return metrics.Counter("ruvllm_admission_admitted", "Requests admitted to the engines.")

    @cached_property
    def rejected(self) -> metrics.Counter:
        return metrics.Counter("ruvllm_admission_rejected", "Requests turned away with 429.",
                               tag_keys=("reason",))

    @cached_property
    def queued(self) -> metrics.Gauge:
        return metrics.Gauge("ruvllm_admission_queued", "Requests waiting for capacity.")

    @cached_property
    def inflight_tokens(self) -> metrics.Gauge:
        return metrics.Gauge("ruvllm_admission_inflight_tokens",
                             "Predicted KV tokens of admitted, unfinished requests.")

    @cached_property
    def queue_wait_seconds(self) -> metrics.Histogram:
        return metrics.Histogram("ruvllm_admission_queue_wait_seconds",
                                 "Time admitted requests waited in the queue.",
                                 boundaries=WAIT_BUCKETS_S)


class AdapterMetrics:
    @cached_property
    def loads(self) -> metrics.Counter:
        return metrics.Counter("ruvllm_adapter_loads", "Adapters loaded into an engine.",
                               tag_keys=("cause",))

    @cached_property
    def evictions(self) -> metrics.Counter:
        return metrics.Counter("ruvllm_adapter_evictions", "Adapters evicted from an engine.")

    @cached_property
    def hits(self) -> metrics.Counter:
        return metrics.Counter("ruvllm_adapter_hits",
                               "Requests whose adapter was already resident.")

    @cached_property
    def resident(self) -> metrics.Gauge:
        return metrics.Gauge("ruvllm_adapter_resident", "Adapters resident in this replica.")
