"""Schema-driven HTTP fuzzing of the live app (schemathesis over tests/openai_openapi.py:
the app's routes with vLLM's own request models as bodies). Valid requests (positive
mode) and requests that break the schema (negative mode: wrong types, missing or extra
fields, out-of-range values) go through the real proxy, ingress, router and engines.
Every answer must be below 500, and every error OpenAI-shaped. The seed is fixed so that
CI is repeatable (`RUVLLM_FUZZ_SEED` explores others); the budget is a fixed number of
examples per route, about 40 s on the 2-core CI machine."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

from conftest import DECLARED, ServeApp

pytestmark = pytest.mark.e2e

BASE = "smollm2-135m-instruct"
SEED = int(os.environ.get("RUVLLM_FUZZ_SEED", "16"))
# (path, method, generation mode, examples): the inference routes get most.
PLAN = [
    ("/v1/chat/completions", "POST", "positive", 12),
    ("/v1/chat/completions", "POST", "negative", 25),
    ("/v1/completions", "POST", "positive", 12),
    ("/v1/completions", "POST", "negative", 25),
    ("/v1/adapters", "POST", "negative", 8),
    ("/v1/adapters/{name}", "DELETE", "positive", 5),
    ("/v1/models", "GET", "positive", 2),
    ("/health", "GET", "positive", 2),
]


@pytest.fixture(scope="module")
def fuzz_schema(serve_app: ServeApp):
    import schemathesis

    from ruvllm.deployments import vllm_compat
    from openai_openapi import openapi_document

    document = openapi_document(vllm_compat.chat_request_cls(),
                                vllm_compat.completion_request_cls(), [BASE, DECLARED[0]])
    return schemathesis.openapi.from_dict(document)


def openai_error_problem(status: int, body: object) -> str | None:
    """Why an error body is not OpenAI's `{"error": {"message", "type", "code", ...}}`."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "no `error` object"
    if not isinstance(error.get("message"), str) or not isinstance(error.get("type"), str):
        return "`error` lacks a message or type"
    if error.get("code") != status:
        return f"`error.code` {error.get('code')!r} is not the status {status}"
    return None


def bounded(body: object) -> object:
    """Negative mode also draws valid values beyond the schema's bounds (max_tokens 9000):
    keep those cheap, as the positive bounds do; and name max_tokens where the body does
    not (an omitted one is 16 tokens; test_security.py covers it)."""
    from openai_openapi import BOUNDED_INTEGERS, MAX_TOKENS

    if not isinstance(body, dict):
        return body
    body = {k: (min(v, BOUNDED_INTEGERS[k]) if k in BOUNDED_INTEGERS and type(v) is int
                else v) for k, v in body.items()}
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS
    return body


@pytest.mark.parametrize("path,method,mode,examples", PLAN,
                         ids=[f"{m} {p} {g}" for p, m, g, _ in PLAN])
def test_fuzzed_requests_get_no_5xx_and_openai_errors(serve_app, fuzz_schema, path, method,
                                                      mode, examples):
    import requests
    from schemathesis.generation import GenerationMode

    operation = fuzz_schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
    session = requests.Session()
    sent: list[int] = []
    started = time.monotonic()

    @seed(SEED)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck),
              # No shrinking: each step is a live request (it took 5 minutes once).
              phases=[Phase.explicit, Phase.generate])
    @given(case=strategy)
    def fuzz(case) -> None:
        if case.body is not None and not isinstance(case.body, (bytes, str)):
            case.body = bounded(case.body)
        # The admin routes answer 401 to this token-less client before reading a body.
        response = case.call(base_url=serve_app.base_url, session=session, timeout=60)
        sent.append(response.status_code)
        described = f"{method} {path} {case.body!r:.500} -> {response.status_code} " \
                    f"{response.text[:500]}"
        assert response.status_code < 500, described
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            problem = openai_error_problem(response.status_code, body)
            assert problem is None, f"{problem}: {described}"

    fuzz()
    assert sent, "nothing was sent"
    print(f"\n{method} {path} {mode}: {len(sent)} requests in "
          f"{time.monotonic() - started:.1f} s, statuses {sorted(set(sent))}")
