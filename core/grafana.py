"""The Grafana dashboard for ruvllm-serve, generated so that its metric names are the
ones a test scrapes from a running app (`tests/e2e/test_metrics.py`).

    ruvllm k8s render --all     # also writes k8s/base/grafana/ruvllm-dashboard.json

Names are as Ray's metrics agent exports them: `ray_` + the metric's name, counters
with `_total`; vLLM's `vllm:x` metrics become `ray_vllm_x` (Ray forbids ':').
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

DASHBOARD_PATH = ("k8s", "base", "grafana", "ruvllm-dashboard.json")


@dataclass(frozen=True)
class Panel:
    title: str
    exprs: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"


def _p(q: float, metric: str, by: str = "") -> str:
    group = f"le{',' + by if by else ''}"
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[5m])))"


ROWS: dict[str, list[Panel]] = {
    "Admission (ingress)": [
        Panel("Admitted / rejected per second", (
            ("sum(rate(ray_ruvllm_admission_admitted_total[1m]))", "admitted"),
            ("sum by (reason) (rate(ray_ruvllm_admission_rejected_total[1m]))",
             "rejected {{reason}}"),
        ), "reqps"),
        Panel("Queue and in-flight KV tokens", (
            ("sum(ray_ruvllm_admission_queued)", "queued requests"),
            ("sum(ray_ruvllm_admission_inflight_tokens)", "in-flight tokens"),
        )),
        Panel("Queue wait", (
            (_p(0.5, "ray_ruvllm_admission_queue_wait_seconds"), "p50"),
            (_p(0.99, "ray_ruvllm_admission_queue_wait_seconds"), "p99"),
        ), "s"),
    ],
    "Routing and adapter placement": [
        Panel("Routing decisions by reason", (
            ("sum by (reason) (rate(ray_ruvllm_routing_decisions_total[1m]))", "{{reason}}"),
        ), "reqps"),
        Panel("Routing decision time", (
            (_p(0.99, "ray_ruvllm_routing_decision_seconds"), "p99"),
        ), "s"),
        Panel("Adapter loads, evictions, hits", (
            ("sum by (cause) (rate(ray_ruvllm_adapter_loads_total[5m]))", "loads {{cause}}"),
            ("sum(rate(ray_ruvllm_adapter_evictions_total[5m]))", "evictions"),
            ("sum(rate(ray_ruvllm_adapter_hits_total[5m]))", "hits"),
        ), "ops"),
        Panel("Adapters resident per replica", (
            ("ray_ruvllm_adapter_resident", "{{ReplicaId}}"),
        )),
    ],
    "Engines (vLLM)": [
        Panel("KV cache usage", (
            ("ray_vllm_kv_cache_usage_perc", "{{model_name}} {{ReplicaId}}"),
        ), "percentunit"),
        Panel("Running / waiting requests", (
            ("sum by (model_name) (ray_vllm_num_requests_running)", "running {{model_name}}"),
            ("sum by (model_name) (ray_vllm_num_requests_waiting)", "waiting {{model_name}}"),
        )),
        Panel("Prefix cache hit rate", (
            ("sum(rate(ray_vllm_prefix_cache_hits_total[5m])) / "
             "sum(rate(ray_vllm_prefix_cache_queries_total[5m]))", "hit rate"),
        ), "percentunit"),
        Panel("Time to first token", (
            (_p(0.5, "ray_vllm_time_to_first_token_seconds"), "p50"),
            (_p(0.99, "ray_vllm_time_to_first_token_seconds"), "p99"),
        ), "s"),
        Panel("Time per output token", (
            (_p(0.5, "ray_vllm_request_time_per_output_token_seconds"), "p50"),
            (_p(0.99, "ray_vllm_request_time_per_output_token_seconds"), "p99"),
        ), "s"),
        Panel("Tokens per second", (
            ("sum(rate(ray_vllm_generation_tokens_total[1m]))", "generated"),
            ("sum(rate(ray_vllm_prompt_tokens_total[1m]))", "prompt"),
        )),
    ],
}



def metric_names() -> set[str]:
    """Every exported series name the dashboard queries (histograms as `_bucket`)."""
    names = set()
    for panels in ROWS.values():
        for panel in panels:
            for expr, _ in panel.exprs:
                for name in re.findall(r"\bray_[a-z0-9_]+", expr):
                    names.add(name)
    return names


def dashboard() -> dict:
    panels, y, next_id = [], 0, 1
    for row, row_panels in ROWS.items():
        panels.append({"type": "row", "title": row, "id": next_id, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id, y = next_id + 1, y + 1
        for i, panel in enumerate(row_panels):
            panels.append({
                "type": "timeseries", "title": panel.title, "id": next_id,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "targets": [{"expr": expr, "legendFormat": legend, "refId": chr(65 + j)}
                            for j, (expr, legend) in enumerate(panel.exprs)],
            })
            next_id += 1
        y += 8 * ((len(row_panels) + 2) // 3)
    return {
        "title": "ruvllm-serve", "uid": "ruvllm-serve", "schemaVersion": 39, "version": 1,
        "tags": ["ruvllm", "ray", "vllm"], "timezone": "browser", "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource",
                                 "query": "prometheus", "label": "Prometheus"}]},
        "panels": panels,
    }


def dashboard_text() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"
