"""What KubeRay does, without Kubernetes: the session's app was deployed by PUTting the
cpu-dev profile's generated serveConfigV2 to a local Ray head's Serve REST API (see
conftest.deploy_and_wait). Here: Serve reports it RUNNING with every deployment healthy,
and it answers over HTTP."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.e2e


def test_rest_deployed_app_is_running_and_answers(serve_app):
    head = serve_app.head
    r = httpx.get(f"{head.dashboard_url}/api/serve/applications/",
                  headers=head.auth_headers(), timeout=30)
    assert r.status_code == 200, r.text
    app = r.json()["applications"][serve_app.app_name]
    assert app["status"] == "RUNNING"
    assert app["deployed_app_config"]["import_path"] == "ruvllm.deployments.app:build_app"
    deployments = app["deployments"]
    assert {"OpenAIIngress", "LLMReplica", "PlacementController"} <= set(deployments)
    assert all(d["status"] == "HEALTHY" for d in deployments.values()), deployments
    answer = httpx.post(f"{serve_app.openai_url}/chat/completions", timeout=120, json={
        "model": "smollm2-135m-instruct", "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert answer.status_code == 200, answer.text
    assert "Paris" in answer.json()["choices"][0]["message"]["content"]
