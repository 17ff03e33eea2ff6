"""Admission control through HTTP: more sessions than the engines hold, and fairness
between tenants. The test app's engines hold 2 x 16 sequences and queue 16 more."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest

pytestmark = pytest.mark.e2e

BASE = "smollm2-135m-instruct"


async def session(client: httpx.AsyncClient, url: str, i: int, turns: int,
                  statuses: Counter, problems: list) -> None:
    messages = [{"role": "system", "content": "You are terse."}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Session {i}, turn {turn}: say a number."})
        r = await client.post(url, json={"model": BASE, "messages": messages, "max_tokens": 12},
                              headers={"x-session-id": f"s{i}", "x-tenant-id": f"user{i % 10}"})
        statuses[r.status_code] += 1
        if r.status_code == 200:
            reply = r.json()["choices"][0]
            if reply["finish_reason"] not in ("stop", "length"):
                problems.append(("unfinished", reply))
            messages.append({"role": "assistant", "content": reply["message"]["content"]})
        elif r.status_code == 429:
            if not r.headers.get("retry-after", "").isdigit():
                problems.append(("429 without Retry-After", dict(r.headers)))
            if r.json()["error"]["code"] != 429:
                problems.append(("429 body", r.text))
            await asyncio.sleep(min(int(r.headers.get("retry-after", "1")), 3))
        else:
            problems.append((r.status_code, r.text))
            return


def test_hundred_sessions_over_capacity_get_429s_never_5xx(serve_app):
    statuses: Counter = Counter()
    problems: list = []

    async def run() -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=180, limits=limits) as client:
            url = f"{serve_app.openai_url}/chat/completions"
            await asyncio.gather(*(session(client, url, i, 2, statuses, problems)
                                   for i in range(100)))

    asyncio.run(run())
    assert not problems, problems[:5]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] > 0, f"capacity should have been exceeded: {statuses}"
    assert statuses[200] >= 32, statuses
    # The server is healthy afterwards.
    r = httpx.post(f"{serve_app.openai_url}/chat/completions", timeout=60, json={
        "model": BASE, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200


def test_flooding_tenant_does_not_starve_a_light_one(serve_app):
    url = f"{serve_app.openai_url}/chat/completions"

    async def request(client, tenant: str, i: int) -> tuple[int, float]:
        r = await client.post(url, headers={"x-tenant-id": tenant}, json={
            "model": BASE, "max_tokens": 24, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"{tenant} request {i}"}]})
        return r.status_code, time.monotonic()

    async def run():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=180, limits=limits) as client:
            flood = [asyncio.create_task(request(client, "flood", i)) for i in range(48)]
            await asyncio.sleep(1.0)  # the flood fills the engines and the queue first
            light = []
            for i in range(2):
                light.append(await request(client, "light", i))
            return await asyncio.gather(*flood), light

    flood, light = asyncio.run(run())
    assert [status for status, _ in light] == [200] * 2, light
    assert {status for status, _ in flood} <= {200, 429}
    flood_done = sorted(t for status, t in flood if status == 200)
    # The flood fills every engine slot and the whole queue before the light tenant
    # arrives: first in, first out would refuse it (queue full) or, with room, put it
    # behind every queued flood request, so it would finish last. Fair queuing admits it
    # at the next free slot, in the same wave as the queued flood requests. Which of that
    # wave's ~17 requests finishes first is down to scheduling (a run measured 5 flood
    # requests finishing after it, another 8+), so only "not last" is asserted.
    after_light = [t for t in flood_done if t > light[0][1]]
    assert len(after_light) >= 1, (len(after_light), len(flood_done))
