"""Two engine replicas on two GPUs of one host, behind the router: Ray gives each its own
card, and both serve requests."""

from __future__ import annotations

import asyncio

import httpx

from gpu_app import BASE, needs_gpus, two_gpu_app  # noqa: F401

pytestmark = needs_gpus(2)


def test_two_replicas_on_two_gpus_each_serve(two_gpu_app):
    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post(f"{two_gpu_app.openai_url}/chat/completions", json={
            "model": BASE, "max_tokens": 32, "temperature": 0.7, "seed": i,
            "messages": [{"role": "user", "content": f"Say something about {i}."}]})

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    responses = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses][:3]
    served = {r.headers["x-ruvllm-replica"] for r in responses}
    assert len(served) == 2, served
    cards = [tuple(two_gpu_app.engine_stats(rid)["gpu_ids"]) for rid in served]
    assert all(len(c) == 1 for c in cards) and len(set(cards)) == 2, cards
