"""An X-LoRA mixture served by its own vLLM replica, next to the base model and plain
LoRA adapters on the other replicas, with prefix caching on."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from conftest import XLORA_NAME

pytestmark = pytest.mark.e2e

BASE = "smollm2-135m-instruct"


def test_mixture_is_a_model_with_the_base_as_parent(openai_client):
    cards = {m.id: m for m in openai_client.models.list().data}
    assert cards[XLORA_NAME].parent == BASE


def test_streaming_request_to_the_mixture_with_prefix_cache_hits(serve_app):
    prompt = "def parse(line):\n    " + "fields = line.split(',')\n    " * 12
    replicas = set()
    for _ in range(2):
        pieces = []
        with httpx.stream("POST", f"{serve_app.openai_url}/completions", timeout=120, json={
                "model": XLORA_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                "stream": True}) as r:
            assert r.status_code == 200
            replicas.add(r.headers["x-ruvllm-replica"])
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:])["choices"][0]["text"])
        assert "".join(pieces).strip()
    (replica,) = replicas
    stats = serve_app.engine_stats(replica)
    # The second request's prompt blocks came from the prefix cache (both KV caches).
    assert stats["prefix_cache_hits"] > 0, stats


def test_mixture_runs_concurrently_with_base_and_lora_requests(serve_app):
    async def one(client, model: str, i: int) -> tuple[str, str, int]:
        r = await client.post(f"{serve_app.openai_url}/chat/completions", json={
            "model": model, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write JSON for item {i}."}]})
        return model, r.headers.get("x-ruvllm-replica", ""), r.status_code

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            jobs = [one(client, m, i) for i in range(3) for m in (XLORA_NAME, BASE, "alpha")]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    assert all(status == 200 for _, _, status in results), results
    mixture_replicas = {rep for m, rep, _ in results if m == XLORA_NAME}
    other_replicas = {rep for m, rep, _ in results if m != XLORA_NAME}
    assert mixture_replicas and not (mixture_replicas & other_replicas)


def test_mixture_output_differs_from_the_base_model(serve_app):
    def complete(model: str) -> str:
        r = httpx.post(f"{serve_app.openai_url}/completions", timeout=120, json={
            "model": model, "prompt": '{"id": 3, "name": "lyra-kernel", "tags": [',
            "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert complete(XLORA_NAME) != complete(BASE)


def test_per_token_expert_weights_on_request(serve_app):
    body = {"model": XLORA_NAME, "prompt": '{"id": 3, "name": "lyra-kernel", "tags": [',
            "max_tokens": 12, "temperature": 0, "xlora_scalings": True}
    url = f"{serve_app.openai_url}/completions"
    # A full extra forward on the replica per request: the admin token's, not any client's.
    r = httpx.post(url, timeout=120, json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == 401, r.text
    r = httpx.post(url, timeout=120, json=body, headers=serve_app.admin_headers())
    assert r.status_code == 200, r.text
    reply = r.json()
    scalings = reply["xlora_scalings"]
    assert [e.split(":")[-1] for e in scalings["experts"]] == ["python", "json", "prose"]
    assert len(scalings["tokens"]) == reply["usage"]["completion_tokens"]
    for row in scalings["tokens"]:
        assert len(row["weights"]) == 3
        assert abs(sum(row["weights"]) - 1) < 1e-3  # softmax over experts, no top-k
    # Continuing a JSON record, the classifier leans on the JSON expert.
    mean = [sum(row["weights"][e] for row in scalings["tokens"]) / len(scalings["tokens"])
            for e in range(3)]
    assert mean[1] == max(mean), mean
    assert "token_ids" not in reply["choices"][0]  # used internally, not asked for


def test_expert_weights_field_is_refused_where_it_cannot_apply(serve_app):
    for model, extra in ((BASE, {}), (XLORA_NAME, {"stream": True}),
                         (XLORA_NAME, {"xlora_scalings": "sometimes"})):
        body = {"model": model, "prompt": "Hello", "max_tokens": 4, "xlora_scalings": True,
                **extra}
        r = httpx.post(f"{serve_app.openai_url}/completions", timeout=120, json=body,
                       headers=serve_app.admin_headers())
        assert r.status_code == 400, (model, extra, r.text)
        assert r.json()["error"]["param"] == "xlora_scalings"
