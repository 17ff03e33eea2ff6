"""Abuse refused through the real app: the admin API's content type, body size, nesting,
over-long prompts, unbounded fields, and requests charged as the engine runs them.
Every refusal is OpenAI-shaped, and the server keeps serving after it."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from conftest import METERED_TENANT

pytestmark = pytest.mark.e2e

BASE = "smollm2-135m-instruct"
HI = [{"role": "user", "content": "Say hi."}]


def refused(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    return error


def still_serving(serve_app) -> None:
    r = httpx.post(f"{serve_app.openai_url}/chat/completions", timeout=60,
                   json={"model": BASE, "messages": HI, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_admin_post_must_be_json(serve_app):
    url = f"{serve_app.openai_url}/adapters"
    admin = serve_app.admin_headers()
    # What a web page can send cross-site without a CORS preflight.
    body = json.dumps({"name": "cross-site", "path": "delta"})
    for media in ("text/plain", "application/x-www-form-urlencoded"):
        r = httpx.post(url, content=body, headers={**admin, "content-type": media}, timeout=30)
        refused(r, 415)
    names = [a["name"] for a in httpx.get(url, headers=admin, timeout=30).json()["adapters"]]
    assert "cross-site" not in names
    refused(httpx.get(url, timeout=30), 401)  # placement is admin-only too


def test_body_over_the_limit_is_413_before_parsing(serve_app):
    limit = serve_app.config.ingress.max_body_bytes
    url = f"{serve_app.openai_url}/chat/completions"
    for size in (limit + 1, 32 * 2**20):
        content = json.dumps({"model": BASE, "messages": [
            {"role": "user", "content": "x" * size}]}).encode()
        started = time.monotonic()
        r = httpx.post(url, content=content, timeout=120,
                       headers={"content-type": "application/json"})
        print(f"{len(content)} bytes: {r.status_code} in {time.monotonic() - started:.2f} s")
        refused(r, 413)
    still_serving(serve_app)


def test_far_too_long_prompt_is_a_400_without_tokenizing(serve_app):
    started = time.monotonic()
    r = httpx.post(f"{serve_app.openai_url}/chat/completions", timeout=120, json={
        "model": BASE, "messages": [{"role": "user", "content": "hello " * 500_000}]})
    print(f"3 MB prompt: {r.status_code} in {time.monotonic() - started:.2f} s")
    assert "context" in refused(r, 400, "messages")["message"]
    r = httpx.post(f"{serve_app.openai_url}/completions", timeout=120, json={
        "model": BASE, "prompt": ["hi", "hello " * 500_000]})
    refused(r, 400, "prompt")
    still_serving(serve_app)


def test_deep_nesting_and_unbounded_fields_are_400(serve_app):
    url = f"{serve_app.openai_url}/chat/completions"
    deep = b'{"model": "' + BASE.encode() + b'", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    refused(httpx.post(url, content=deep, headers={"content-type": "application/json"},
                       timeout=60), 400)
    for extra, param in (({"stop": ["."] * 100}, "stop"),
                         ({"stop": "x" * 10_000}, "stop"),
                         ({"user": "u" * 10_000}, "user")):
        refused(httpx.post(url, timeout=60, json={"model": BASE, "messages": HI, **extra}),
                400, param)
    refused(httpx.post(url, timeout=60, headers={"x-session-id": "s" * 10_000},
                       json={"model": BASE, "messages": HI}), 400)
    still_serving(serve_app)


def test_sequences_are_charged_and_capped(serve_app):
    chat = f"{serve_app.openai_url}/chat/completions"
    refused(httpx.post(chat, timeout=60, json={"model": BASE, "messages": HI, "n": 10_000,
                                                "max_tokens": 4}), 400, "n")
    refused(httpx.post(f"{serve_app.openai_url}/completions", timeout=60, json={
        "model": BASE, "prompt": ["hi"] * 9, "n": 2, "max_tokens": 4}), 400, "n")
    r = httpx.post(chat, timeout=60, json={"model": BASE, "messages": HI, "n": 3,
                                           "max_tokens": 4})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3, r.text
    r = httpx.post(f"{serve_app.openai_url}/completions", timeout=60, json={
        "model": BASE, "prompt": "hi", "prompt_embeds": "AAAA"})
    refused(r, 400, "prompt_embeds")


def test_request_beyond_its_tenants_whole_budget_is_400_not_429(serve_app):
    # The metered tenant may admit 1000 predicted tokens a minute: 3 x (prompt + 400)
    # can never pass, so waiting and retrying (429 + Retry-After) would not help.
    r = httpx.post(f"{serve_app.openai_url}/chat/completions", timeout=60,
                   headers={"x-tenant-id": METERED_TENANT},
                   json={"model": BASE, "messages": HI, "n": 3, "max_tokens": 400})
    refused(r, 400)
    assert "retry-after" not in r.headers
    r = httpx.post(f"{serve_app.openai_url}/chat/completions", timeout=60,
                   headers={"x-tenant-id": METERED_TENANT},
                   json={"model": BASE, "messages": HI, "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_omitted_max_tokens_is_the_configured_default(serve_app):
    default = serve_app.config.admission.default_output_tokens
    # Charged as what the engine is then told it may generate, not the whole context.
    r = httpx.post(f"{serve_app.openai_url}/chat/completions", timeout=120, json={
        "model": BASE, "messages": HI, "ignore_eos": True})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["usage"]["completion_tokens"] == default
    assert reply["choices"][0]["finish_reason"] == "length"


def test_a_deleted_adapter_name_does_not_come_back_with_other_weights(serve_app):
    url = f"{serve_app.openai_url}/adapters"
    admin = serve_app.admin_headers()
    assert httpx.post(url, json={"name": "reused", "path": "delta"}, headers=admin,
                      timeout=30).status_code == 201
    assert httpx.delete(f"{url}/reused", headers=admin, timeout=30).status_code == 200
    # Replicas may still hold delta's weights as "reused": epsilon's must not hide there.
    refused(httpx.post(url, json={"name": "reused", "path": "epsilon"}, headers=admin,
                       timeout=30), 409)
    assert httpx.post(url, json={"name": "reused", "path": "delta"}, headers=admin,
                      timeout=30).status_code == 201
    assert httpx.delete(f"{url}/reused", headers=admin, timeout=30).status_code == 200


def test_adapter_names_and_paths_the_fuzz_tests_broke_on_are_400(serve_app):
    """Found by tests/test_fuzz_adapters.py: these reached the controller as a ValueError /
    OSError / RuntimeError (a 500) or, for the name, were accepted."""
    url = f"{serve_app.openai_url}/adapters"
    admin = serve_app.admin_headers()
    for body in ({"name": "nul", "path": "del\u0000ta"}, {"name": "long", "path": "x" * 5000},
                 {"name": "delta\n", "path": "delta"}):
        refused(httpx.post(url, json=body, headers=admin, timeout=30), 400)
