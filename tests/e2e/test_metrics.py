"""Observability: after real traffic, Ray's Prometheus endpoint (the head's
`--metrics-export-port`, what the PodMonitor scrapes) carries every metric the Grafana
dashboard queries, router and engine alike, with non-zero values."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADAPTERS
from ruvllm.grafana import metric_names

pytestmark = pytest.mark.e2e

BASE = "smollm2-135m-instruct"
# Admission sends an engine no more sequences than it runs at once, so vLLM's own waiting
# queue stays empty by design: this series must be exported, but it may read zero.
PRESENCE_ONLY = {"ray_vllm_num_requests_waiting"}
STORY_SYSTEM = ("You are a storyteller for a children's library. Every story you tell is "
                "short, kind and concrete, set in a small harbour town with a lighthouse, "
                "a bakery, a ferry and a market square, and it ends with the characters "
                "going home at dusk. Use simple words and no more than five sentences. ") * 2


def scrape(url: str) -> dict[str, float]:
    """Largest sample per series name (histograms: `_bucket`, `_count`, `_sum`)."""
    text = httpx.get(url, timeout=30).text
    values: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = max(values[sample.name], sample.value)
    return values


def test_dashboard_metrics_are_exported_with_values(serve_app):
    url = f"{serve_app.openai_url}/chat/completions"
    wanted = metric_names()
    # Gauges are only non-zero while work is in flight: sample them during the burst.
    peak: dict[str, float] = defaultdict(float)
    statuses: list[int] = []

    async def request(client: httpx.AsyncClient, i: int) -> None:
        # A shared system prompt of several KV blocks: prefix-cache hits within this test,
        # whatever ran before it.
        body = {"model": BASE if i % 4 else ADAPTERS[i % 3], "max_tokens": 96,
                "messages": [{"role": "system", "content": STORY_SYSTEM},
                             {"role": "user", "content": f"Tell story number {i}."}]}
        r = await client.post(url, json=body, headers={"x-tenant-id": f"t{i % 5}"})
        statuses.append(r.status_code)

    async def watch(done: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            while not done.is_set():
                try:
                    text = (await client.get(serve_app.head.metrics_url)).text
                except httpx.HTTPError:
                    text = ""
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        peak[s.name] = max(peak[s.name], s.value)
                await asyncio.sleep(1)

    async def burst() -> None:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            # More requests than the engines run plus the queue holds: some get 429.
            await asyncio.gather(*(request(client, i) for i in range(80)))
        await asyncio.sleep(12)  # Ray's metrics agent exports every ~10 s
        done.set()
        await watcher

    # Adapter churn for the eviction counter: more distinct adapters than the
    # cluster's 2 x 2 slots, registered under fresh names.
    admin = serve_app.admin_headers()
    for name in ADAPTERS:
        r = httpx.post(f"{serve_app.openai_url}/adapters", headers=admin, timeout=30,
                       json={"name": f"metrics-{name}", "path": name})
        assert r.status_code in (200, 201, 409), r.text
        r = httpx.post(url, timeout=120, json={"model": f"metrics-{name}", "max_tokens": 2,
                                               "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text

    asyncio.run(burst())
    assert 200 in statuses and 429 in statuses, sorted(set(statuses))

    deadline = time.monotonic() + 30
    while True:
        final = scrape(serve_app.head.metrics_url)
        seen = {n: max(final.get(n, 0.0), peak.get(n, 0.0)) for n in wanted}
        for name in wanted:  # histograms are queried through `_bucket`; check the count
            if name.endswith("_bucket"):
                seen[name] = max(final.get(name[:-7] + "_count", 0.0), seen[name])
        missing = sorted(n for n, v in seen.items() if v <= 0 and not (
            n in PRESENCE_ONLY and (n in final or n in peak)))
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert not missing, f"dashboard metrics absent or zero: {missing}"
