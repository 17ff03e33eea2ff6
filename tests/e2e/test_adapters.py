"""LoRA adapters through the whole stack: listing, outputs, residency-aware routing,
hot-adapter replication, eviction within the slots, and refusals."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from conftest import ADAPTERS, DECLARED

pytestmark = pytest.mark.e2e

BASE = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Name three colours."}]


def chat(serve_app, model: str, max_tokens: int = 12, **extra) -> httpx.Response:
    return httpx.post(f"{serve_app.openai_url}/chat/completions", timeout=120, json={
        "model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0,
        **extra})


def test_models_lists_base_and_adapters_with_parent(openai_client):
    cards = {m.id: m for m in openai_client.models.list().data}
    assert BASE in cards and set(DECLARED) <= set(cards)
    for name in DECLARED:
        assert cards[name].parent == BASE


def test_every_adapter_changes_the_output(serve_app):
    base = chat(serve_app, BASE).json()["choices"][0]["message"]["content"]
    outputs = {}
    for name in DECLARED:
        r = chat(serve_app, name)
        assert r.status_code == 200, r.text
        outputs[name] = r.json()["choices"][0]["message"]["content"]
        assert outputs[name] != base, f"adapter {name} did not change the output"
    assert len(set(outputs.values())) == len(DECLARED), outputs


def test_requests_for_an_adapter_land_on_a_replica_holding_it(serve_app):
    served = [chat(serve_app, "gamma", max_tokens=2).headers["x-ruvllm-replica"]
              for _ in range(5)]
    assert len(set(served)) == 1, served
    stats = serve_app.engine_stats(served[0])
    assert "gamma" in stats["adapters"]


def test_runtime_registration_is_admin_only_and_validated(serve_app):
    url = f"{serve_app.openai_url}/adapters"
    body = {"name": "delta", "path": "delta"}
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    assert httpx.post(url, json=body, timeout=30,
                      headers={"authorization": "Bearer wrong"}).status_code == 403
    admin = serve_app.admin_headers()
    for bad, status in [({"name": "../delta", "path": "delta"}, 400),
                        ({"name": "x", "path": "../../etc"}, 403),
                        ({"name": "x", "path": "/etc"}, 403),
                        ({"name": "x", "path": "no-such-adapter"}, 404),
                        ({"name": BASE, "path": "delta"}, 409),
                        ({"name": 5}, 400)]:
        r = httpx.post(url, json=bad, headers=admin, timeout=30)
        assert r.status_code == status, (bad, r.text)
        assert r.json()["error"]["code"] == status
    for name in ("delta", "epsilon"):
        r = httpx.post(url, json={"name": name, "path": name}, headers=admin, timeout=30)
        assert r.status_code == 201, r.text
        assert r.json()["rank"] == 8
    assert httpx.post(url, json={"name": "delta", "path": "delta"}, headers=admin,
                      timeout=30).status_code == 409
    assert chat(serve_app, "delta").status_code == 200
    # An unknown or traversal model name is a plain 404, and the server keeps serving.
    for name in ("../alpha", "no-such-adapter"):
        r = chat(serve_app, name)
        assert r.status_code == 404 and r.json()["error"]["code"] == 404
    assert chat(serve_app, BASE).status_code == 200


def test_eviction_keeps_each_replica_within_its_slots(serve_app):
    admin = serve_app.admin_headers()
    for name in ("delta", "epsilon"):  # idempotent with the registration test
        httpx.post(f"{serve_app.openai_url}/adapters", json={"name": name, "path": name},
                   headers=admin, timeout=30)
    for _ in range(2):
        for name in ADAPTERS:
            assert chat(serve_app, name, max_tokens=1).status_code == 200
    replicas = serve_app.replica_ids()
    assert len(replicas) == 2
    stats = [serve_app.engine_stats(r) for r in replicas]
    for s in stats:
        assert len(s["adapters"]) <= s["adapter_slots"] == 2, s
    assert sum(s["evictions"] for s in stats) > 0
    assert sum(s["loads"] for s in stats) >= len(ADAPTERS)


def test_hot_adapter_is_replicated_to_both_replicas(serve_app):
    async def burst() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int) -> str:
                r = await client.post(f"{serve_app.openai_url}/chat/completions", json={
                    "model": "beta", "max_tokens": 2,
                    "messages": [{"role": "user", "content": f"Hello number {i}"}]})
                assert r.status_code == 200, r.text
                return r.headers["x-ruvllm-replica"]
            out = []
            for wave in range(4):
                out += await asyncio.gather(*(one(wave * 10 + i) for i in range(10)))
            return out

    served = asyncio.run(burst())
    deadline = time.monotonic() + 30
    while True:
        described = httpx.get(f"{serve_app.openai_url}/adapters",
                              headers=serve_app.admin_headers(), timeout=30).json()
        beta = next(a for a in described["adapters"] if a["name"] == "beta")
        if len(beta["replicas"]) == 2:
            break
        assert time.monotonic() < deadline, (beta, set(served))
        # Keep the demand up while the plan is carried out.
        chat(serve_app, "beta", max_tokens=1)
        time.sleep(1)
    assert beta["requests_per_s"] > 0


def test_an_adapter_spoiled_after_registration_fails_alone(serve_app, adapter_root):
    """Files that passed registration and broke afterwards: the replica that tries to load
    them answers 422, evicts none of its resident adapters for it, and keeps serving."""
    import os
    import shutil

    admin = serve_app.admin_headers()
    url = f"{serve_app.openai_url}/adapters"
    for name in ("delta", "epsilon"):  # idempotent with the registration test
        httpx.post(url, json={"name": name, "path": name}, headers=admin, timeout=30)
    # Every base replica full: loading one more adapter anywhere means evicting one.
    deadline = time.monotonic() + 60
    while True:
        stats = {r: serve_app.engine_stats(r) for r in serve_app.replica_ids()}
        if all(len(s["adapters"]) >= s["adapter_slots"] for s in stats.values()):
            break
        assert time.monotonic() < deadline, stats
        for name in ADAPTERS:
            assert chat(serve_app, name, max_tokens=1).status_code == 200

    spoiled = f"spoiled-{os.getpid()}"
    shutil.copytree(adapter_root / "delta", adapter_root / spoiled)
    r = httpx.post(url, json={"name": spoiled, "path": spoiled}, headers=admin, timeout=30)
    assert r.status_code == 201, r.text
    # No replica has room to pre-load it, so nothing has read it yet.
    (adapter_root / spoiled / "adapter_model.safetensors").write_bytes(
        (16).to_bytes(8, "little") + b"{not a header}  ")
    try:
        r = chat(serve_app, spoiled, max_tokens=1)
        assert r.status_code == 422, r.text
        assert "could not be loaded" in r.json()["error"]["message"]
        tried = r.headers["x-ruvllm-replica"]
        after = serve_app.engine_stats(tried)
        before = stats[tried]
        assert after["evictions"] == before["evictions"], (before, after)
        assert set(after["adapters"]) == set(before["adapters"]), (before, after)
        # It keeps serving: its resident adapters (still hits, no load) and the base model.
        for name in after["adapters"]:
            assert chat(serve_app, name, max_tokens=1).status_code == 200
        assert chat(serve_app, BASE, max_tokens=1).status_code == 200
    finally:
        httpx.delete(f"{url}/{spoiled}", headers=admin, timeout=30)
