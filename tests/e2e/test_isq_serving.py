"""In-situ quantization end to end: jobs run as Ray tasks before replicas start, results
are cached and reused, the quality gate stops a deployment, and the session app serves
a GPTQ-quantized variant over HTTP (built by its app builder when the session began)."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from conftest import ISQ_NAME, ISQ_VARIANT

pytestmark = pytest.mark.e2e

BASE = "smollm2-135m-instruct"
# RTN needs no calibration data: the cheapest job that still runs the whole pipeline.
RTN = {"method": "rtn", "bits": 8, "activation_bits": 8, "num_cpus": 0,
       "evaluation": {"windows": 12, "seq_len": 256, "out_of_distribution": False}}


def test_quantized_variant_answers_over_http(serve_app):
    cards = {m["id"]: m for m in httpx.get(f"{serve_app.openai_url}/models",
                                          timeout=30).json()["data"]}
    card = cards[ISQ_NAME]
    assert card["parent"] == BASE
    report = json.loads((Path(card["root"]) / "isq-report.json").read_text())
    assert (report["method"], report["bits"], report["activation_bits"]) == ("gptq", 8, 8)
    assert report["calibration"]["windows"] == ISQ_VARIANT["isq"]["calibration"]["samples"]
    assert report["bytes"]["linear_ratio"] < 0.55  # int8 weights + per-channel scales
    config = json.loads((Path(card["root"]) / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"

    # W8A8 loses ~2.5% held-out perplexity on this 135M model, enough to change some
    # greedy answers (its chat answer about France's capital drifts; Japan's holds).
    r = httpx.post(f"{serve_app.openai_url}/chat/completions", timeout=120, json={
        "model": ISQ_NAME, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of Japan?"}]})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == ISQ_NAME
    assert "Tokyo" in r.json()["choices"][0]["message"]["content"]
    replica = r.headers["x-ruvllm-replica"]
    stats = serve_app.engine_stats(replica)
    assert stats["dedicated"] == ISQ_NAME  # its own deployment, not a base replica
    # bfloat16 on an AMX CPU, whose int8 kernel takes nothing else; float32 elsewhere.
    from ruvllm.deployments.vllm_engine import cpu_auto_dtype

    assert stats["dtype"] == cpu_auto_dtype(Path(card["root"]))

    with httpx.stream("POST", f"{serve_app.openai_url}/completions", timeout=120, json={
            "model": ISQ_NAME, "prompt": "The capital of France is", "max_tokens": 8,
            "temperature": 0, "stream": True}) as s:
        assert s.status_code == 200
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in s.iter_lines()
                       if line.startswith("data: {"))
    assert "Paris" in text


def test_job_runs_as_a_ray_task_and_its_result_is_reused(serve_app, base_model_path):
    import ray
    from ray.util.state import list_tasks

    from ruvllm.isq.job import cache_key, quantize_on_ray, result_dir, weights_digest
    from ruvllm.config import IsqConfig

    cache = serve_app.config.resolved_cache_dir
    isq = IsqConfig.model_validate(RTN)
    target = result_dir(cache, BASE, isq, cache_key(weights_digest(base_model_path), isq, None))
    shutil.rmtree(target, ignore_errors=True)  # this test owns this key: build it afresh

    first = quantize_on_ray(base_model_path, BASE, isq, cache)
    assert not first.reused and first.path == target
    assert (target / "model.safetensors").is_file()
    leftovers = [p for p in target.parent.glob(f".{target.name}.*") if p.suffix != ".lock"]
    assert not leftovers  # no temporary directory left behind
    built_at = (target / "model.safetensors").stat().st_mtime_ns

    started = time.monotonic()
    second = quantize_on_ray(base_model_path, BASE, isq, cache)
    assert second.reused and second.path == target
    assert second.report == first.report
    assert (target / "model.safetensors").stat().st_mtime_ns == built_at
    assert time.monotonic() - started < first.report["job_seconds"]

    assert ray.is_initialized()
    # Ray's task events reach its state API a little after the task ends.
    deadline = time.monotonic() + 60
    while True:
        tasks = list_tasks(address=ray.get_runtime_context().gcs_address,
                           filters=[("name", "=", f"isq:{BASE}:rtn-w8")], detail=True)
        finished = [t for t in tasks if t.state == "FINISHED"]
        if len(finished) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert len(finished) >= 2, [(t.task_id, t.state) for t in tasks]


def test_failing_quality_gate_stops_the_deployment(serve_app):
    """A second application whose variant cannot meet its gate: Serve reports it
    DEPLOY_FAILED with both perplexities named; the session app keeps serving."""
    head = serve_app.head
    url = f"{head.dashboard_url}/api/serve/applications/"
    config = copy.deepcopy(serve_app.serve_config)
    (app,) = config["applications"]
    gated = copy.deepcopy(app)
    gated.update(name="gated", route_prefix="/gated")
    gated["args"] = {**gated["args"], "xlora": [], "replicas": {"num_replicas": 1},
                     "quantized": [{"name": "strict-rtn",
                                    "isq": {**RTN, "max_perplexity_increase": 0.0001}}]}
    config["applications"].append(gated)
    r = httpx.put(url, json=config, headers=head.auth_headers(), timeout=60)
    assert r.status_code == 200, r.text
    try:
        deadline = time.monotonic() + 600
        status, message = None, ""
        while time.monotonic() < deadline:
            apps = httpx.get(url, headers=head.auth_headers(), timeout=30).json()["applications"]
            status, message = apps["gated"]["status"], apps["gated"].get("message", "")
            if status in ("DEPLOY_FAILED", "RUNNING"):
                break
            time.sleep(2)
        assert status == "DEPLOY_FAILED", (status, message)
        assert "quantized.strict-rtn.isq" in message and "quality gate" in message, message
        assert "max_perplexity_increase" in message
        assert message.count("perplexity") >= 2 and " to " in message  # base -> quantized
        assert apps[serve_app.app_name]["status"] == "RUNNING"
        assert not any(name.startswith("ISQ-strict") for name in apps["gated"]["deployments"])
    finally:
        r = httpx.put(url, json=serve_app.serve_config, headers=head.auth_headers(), timeout=60)
        assert r.status_code == 200, r.text
    answer = httpx.post(f"{serve_app.openai_url}/chat/completions", timeout=120, json={
        "model": BASE, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hi."}]})
    assert answer.status_code == 200, answer.text


def test_session_variant_was_built_by_the_app_builder(serve_app):
    """The session app's variant came from the cache key its config names."""
    from ruvllm.isq.job import calibration_windows, cache_key, result_dir, weights_digest
    from ruvllm.config import IsqConfig
    from ruvllm.model_store import prepare_builtin

    base = prepare_builtin(BASE)
    isq = IsqConfig.model_validate(ISQ_VARIANT["isq"])
    key = cache_key(weights_digest(base), isq, calibration_windows(
        base, isq.calibration, isq.holds_out_calibration))
    target = result_dir(serve_app.config.resolved_cache_dir, BASE, isq, key)
    cards = {m["id"]: m for m in httpx.get(f"{serve_app.openai_url}/models",
                                          timeout=30).json()["data"]}
    assert Path(cards[ISQ_NAME]["root"]) == target
