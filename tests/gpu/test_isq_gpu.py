"""An ISQ job on the GPU whose W4A16 checkpoint a vLLM replica then serves on the GPU.

GPTQ W4A16 at group size 64: the default model's hidden size is 576 = 9 x 64, so 128
(the project's default) would split groups; 64 is a size both of vLLM 0.26's CUDA
weight-only kernels take. Which kernel vLLM picks is per layer: Machete (Hopper) wants
output features divisible by 128, which only gate_up (3072) is; qkv (960), o_proj and
down_proj (576) fall to Marlin, which since 0.26 pads a misaligned K tile itself. The
test records what vLLM logged rather than assuming it.

Its own application (same Ray head, same app name, so it replaces any earlier GPU app):
an ISQ failure fails these tests only. The job asks for a whole GPU as a Ray task, so any
earlier application is deleted first, or the task would wait behind its replicas.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from conftest import ADMIN_TOKEN, ServeApp
from gpu_app import BASE, delete_applications, kernels_logged, needs_gpus, start_app

pytestmark = needs_gpus(1)

QUANTIZED = "smollm2-gptq-w4a16"
GROUP_SIZE = 64
DEFAULT_GATE = 0.25  # IsqConfig.max_perplexity_increase's default
# GPTQ W4A16 g64 measured +18.2% held-out perplexity on the CPU (float32 calibration,
# README "isq_bench"); the GPU job calibrates in bfloat16. One device call is all this
# gets, so the gate here leaves room (0.30) and the record says whether the default held.
VARIANT = {"name": QUANTIZED,
           "isq": {"method": "gptq", "bits": 4, "group_size": GROUP_SIZE, "num_cpus": 1,
                   "max_perplexity_increase": 0.30},
           "replicas": {"num_replicas": 1, "num_cpus": 1, "num_gpus": 0.4}}
KERNEL_LOG = re.compile(r"Using (\w+) for CompressedTensorsWNA16")


@pytest.fixture(scope="module")
def isq_gpu_app(ray_head) -> Iterator[ServeApp]:
    delete_applications(ray_head)
    started = time.monotonic()
    for app in start_app(ray_head, {
        # Base and quantized replicas share the card. Quantized replicas never load
        # adapters (deployments/replica.py); the base's LoRA is test_gpu_serving.py's.
        "engine": {"gpu_memory_utilization": 0.25, "enable_lora": False,
                   # Eager: no torch.compile / CUDA graph capture at start (the one-GPU
                   # app's setup took 232 s), leaving the call's minutes to the job. The
                   # kernel choice is the same; decode speed is benchmarks/gpu_decode's.
                   "enforce_eager": True},
        # The admin token opens GET /v1/adapters, where engine_stats reads the replica.
        "adapters": {"allowed_roots": [], "declared": {}, "admin_token": ADMIN_TOKEN},
        "replicas": {"num_replicas": 1, "num_cpus": 1, "num_gpus": 0.4},
        "quantized": [VARIANT],
    }):
        # ISQ job (toolkit env on first use, calibration, GPTQ, evaluation) + replicas.
        _record(app_up_seconds=time.monotonic() - started)
        yield app


_results: dict = {}


def _record(**values) -> None:
    """Append to $RUVLLM_GPU_RESULTS/isq-gpu.json (the device run's $OUT) as we go, so a
    later failure keeps what was measured before it."""
    _results.update(values)
    out = os.environ.get("RUVLLM_GPU_RESULTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "isq-gpu.json").write_text(json.dumps(_results, indent=2, default=str))


def _card(app: ServeApp) -> dict:
    cards = {m["id"]: m for m in httpx.get(f"{app.openai_url}/models", timeout=30).json()["data"]}
    assert QUANTIZED in cards, sorted(cards)
    return cards[QUANTIZED]


def test_isq_job_quantized_on_the_gpu_and_passed_the_gate(isq_gpu_app):
    card = _card(isq_gpu_app)
    assert card["parent"] == BASE
    root = Path(card["root"])
    report = json.loads((root / "isq-report.json").read_text())
    _record(checkpoint=str(root), method=report["method"], bits=report["bits"],
            activation_bits=report["activation_bits"], group_size=report["group_size"],
            device=report.get("device"), job_seconds=report["job_seconds"],
            quantize_seconds=report["quantize_seconds"],
            eval_seconds=report["evaluation"].get("eval_seconds"),
            calibration=report["calibration"], gate=report["gate"],
            bytes=report["bytes"],
            perplexity={s["name"]: {"base": s["base_perplexity"], "quantized": s["perplexity"],
                                    "increase": s["perplexity_increase"], "gated": s["gated"]}
                        for s in report["evaluation"]["sets"]})
    _record(passes_default_gate=all(s["perplexity_increase"] <= DEFAULT_GATE
                                    for s in report["evaluation"]["sets"] if s["gated"]))
    assert (report["method"], report["bits"], report["activation_bits"],
            report["group_size"]) == ("gptq", 4, 16, GROUP_SIZE)
    assert report["device"] not in (None, "cpu"), report.get("device")  # quantized on CUDA
    assert report["gate"]["passed"], report["gate"]
    gated = [s for s in report["evaluation"]["sets"] if s["gated"]]
    assert gated and all(s["perplexity_increase"] <= report["gate"]["max_perplexity_increase"]
                         for s in gated), gated
    assert report["bytes"]["linear_ratio"] < 0.35  # 4-bit weights + g64 scales vs bf16
    config = json.loads((root / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    (group,) = quant["config_groups"].values()
    assert (group["weights"]["num_bits"], group["weights"]["group_size"]) == (4, GROUP_SIZE)


def test_the_w4a16_checkpoint_is_served_on_the_gpu_with_marlin(isq_gpu_app):
    probes = {
        "chat_france": ("chat", "What is the capital of France?", "Paris"),
        "chat_japan": ("chat", "What is the capital of Japan?", "Tokyo"),
        "completion_france": ("completion", "The capital of France is", "Paris"),
    }
    answers, right = {}, []
    for name, (kind, text, expected) in probes.items():
        if kind == "chat":
            r = httpx.post(f"{isq_gpu_app.openai_url}/chat/completions", timeout=120, json={
                "model": QUANTIZED, "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": text}]})
        else:
            r = httpx.post(f"{isq_gpu_app.openai_url}/completions", timeout=120, json={
                "model": QUANTIZED, "prompt": text, "max_tokens": 8, "temperature": 0})
        if r.status_code != 200:
            _record(answers=answers, failed_request={name: r.text})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == QUANTIZED
        choice = r.json()["choices"][0]
        answers[name] = choice["message"]["content"] if kind == "chat" else choice["text"]
        if expected in answers[name]:
            right.append(name)
        replica = r.headers.get("x-ruvllm-replica")
    stats = isq_gpu_app.engine_stats(replica)
    kernels = kernels_logged(KERNEL_LOG)
    _record(answers=answers, right=right, engine_stats={k: stats.get(k) for k in (
        "dtype", "block_size", "gpu_ids", "num_kv_blocks", "quantization")},
        kernels_logged=kernels)
    assert all(a.strip() for a in answers.values()), answers
    # W4 costs this 135M model ~18% held-out perplexity: enough to move some greedy
    # answers (W8A8 already moved France's on the CPU), so any one of three facts holds.
    assert right, answers
    assert stats.get("gpu_ids"), stats
    assert "MarlinLinearKernel" in kernels, kernels
