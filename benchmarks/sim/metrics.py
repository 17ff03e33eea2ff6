"""What a run measured, in the report's terms."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from benchmarks.sim.trace import SEGMENT_KINDS, tokens_by_kind


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def summarize(sim: Any) -> dict[str, Any]:
    """`sim` is a finished benchmarks.sim.simulation.Simulation (not imported: it imports
    this module)."""
    recs = [r for r in sim.records if r.arrival >= sim.cfg.warmup_s]
    base = sim.counters_at_warmup
    ok = [r for r in recs if r.status == "ok"]
    adapter_ok = [r for r in ok if r.adapter]
    now = sim.counters()
    counts = {k: now[k] - base.get(k, 0) for k in now}
    queries, hits = counts["prefix_queries"], counts["prefix_hits"]
    decisions = [d for ing in sim.ingresses for d in ing.policy.decision_s]
    decisions_cpu = [d for ing in sim.ingresses for d in ing.policy.decision_cpu_s]
    duration = max(sim.duration_s - sim.cfg.warmup_s, 1e-9)
    good = [r for r in ok if r.ttft_s <= sim.cfg.ttft_slo_s]
    rejected = defaultdict(int)
    for r in recs:
        if r.status != "ok":
            rejected[r.status] += 1
    n = max(1, len(recs))
    return {
        "requests": len(recs),
        "completed": len(ok),
        "duration_s": duration,
        "rejection_rate": (len(recs) - len(ok)) / n,
        "rejected_by_reason": dict(rejected),
        "completed_req_per_s": len(ok) / duration,
        "goodput_req_per_s": len(good) / duration,
        "goodput_tok_per_s": sum(r.output_tokens for r in good) / duration,
        "throughput_tok_per_s": sum(r.output_tokens for r in ok) / duration,
        "ttft_p50_ms": 1000 * percentile([r.ttft_s for r in ok], 50),
        "ttft_p99_ms": 1000 * percentile([r.ttft_s for r in ok], 99),
        "queue_wait_p99_s": percentile([r.queue_wait_s for r in ok], 99),
        "adapter_requests": len(adapter_ok),
        "adapter_hit_rate": (sum(r.adapter_hit for r in adapter_ok) / len(adapter_ok)
                             if adapter_ok else 1.0),
        "adapter_loads": counts["loads"],
        "adapter_plan_loads": counts["plan_loads"],
        "adapter_evictions": counts["evictions"],
        "cold_loads_per_1k": 1000 * counts["loads"] / max(1, len(ok)),
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "prefix_hit_rate": hits / queries if queries else 0.0,
        # Cached tokens LRU-evicted per replica: 0 means no cache was ever full, so the
        # hit rate was decided by where requests went, not by KV capacity.
        "prefix_evicted_tokens_per_replica": counts.get("prefix_evicted_tokens", 0)
                                             / len(sim.replicas),
        "decision_p50_us": 1e6 * percentile(decisions, 50),
        "decision_p99_us": 1e6 * percentile(decisions, 99),
        "decision_cpu_p50_us": 1e6 * percentile(decisions_cpu, 50),
        "decision_cpu_p99_us": 1e6 * percentile(decisions_cpu, 99),
        "decisions": len(decisions),
        "engine_busy": counts["busy_s"] / (duration * len(sim.replicas)),
        "warmup_s": sim.cfg.warmup_s,
        "prefix_by_kind": prefix_by_kind([(r.prompt, r.cached_tokens) for r in ok]),
        "prefix_by_kind_base_model": prefix_by_kind(
            [(r.prompt, r.cached_tokens) for r in ok if not r.adapter]),
        "tenant_served_tokens": _by_tenant(ok),
        # Admitted while requests were still arriving: once arrivals stop, the backlog
        # drains and every tenant gets what it queued, which says nothing about fairness.
        "tenant_tokens_admitted_under_load": _by_tenant(_admitted_between(
            sim.records, sim.cfg.warmup_s, max((x.arrival for x in sim.records), default=0.0))),
    }


def prefix_by_kind(requests: list[tuple[list, int]]) -> dict[str, dict[str, float]]:
    """Prompt tokens and prefix-cache hits per segment kind (system prompt, document,
    the conversation so far, the new message): where a policy's hits and misses are."""
    tokens: dict[str, int] = defaultdict(int)
    hits: dict[str, int] = defaultdict(int)
    for prompt, cached in requests:
        for kind, (n, h) in tokens_by_kind(prompt, cached).items():
            tokens[kind] += n
            hits[kind] += h
    total = sum(tokens.values()) or 1
    return {k: {"share": tokens[k] / total, "hit_rate": hits[k] / tokens[k] if tokens[k] else 0.0,
                "hits_of_all": hits[k] / total}
            for k in SEGMENT_KINDS if k in tokens}


def _by_tenant(ok: list) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in ok:
        out[r.tenant] += r.prompt_tokens + r.output_tokens
    return dict(out)


def _admitted_between(records: list, start: float, end: float) -> list:
    return [r for r in records
            if r.status == "ok" and start <= r.arrival + r.queue_wait_s <= end]
