"""`engine.w4a16_kernel` on a GPU: a W4A16 checkpoint served through the app on the kernel
the config names, not the one vLLM would pick.

The checkpoint: two decoder layers of Llama-3-8B's shape (the shapes every 4-bit kernel
was measured on, `benchmarks/gpu_decode`), random GPTQ 4-bit weights, the default model's
tokenizer and vocabulary; built in seconds. On Hopper vLLM 0.26 picks Machete for every one
of these layers; the app asks for Humming (the fastest there at every batch size,
`benchmarks/results/gpu_decode/sweep-1202/`). What vLLM chose is read from the log lines its
engine process writes while this module's app starts, not from anything the app reports.

Its own application (same Ray head and app name as the other GPU tests', so it replaces
theirs): it runs after them by file name. Skipped where Humming's package is not installed.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from conftest import ADMIN_TOKEN, ServeApp
from gpu_app import delete_applications, kernels_logged, log_sizes, needs_gpus, start_app

pytestmark = needs_gpus(1)

SERVED = "llama8b-shape-gptq"
KERNEL_LOG = re.compile(r"Using (\w+LinearKernel)")


def _two_layer_gptq(base_model_path: Path, root: Path) -> Path:
    from benchmarks.gpu_decode import build_random_gptq
    from benchmarks.gpu_stack_vs_vllm import copy_tokenizer

    like = root / "like"
    like.mkdir(parents=True, exist_ok=True)
    config = json.loads((base_model_path / "config.json").read_text())
    config.update(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  tie_word_embeddings=False, dtype="bfloat16", torch_dtype="bfloat16")
    (like / "config.json").write_text(json.dumps(config))
    copy_tokenizer(base_model_path, like)
    return build_random_gptq(root / SERVED, like)


@pytest.fixture(scope="module")
def humming_app(ray_head, base_model_path, tmp_path_factory) -> Iterator[tuple[ServeApp, set]]:
    pytest.importorskip("humming", reason="Humming's package (humming-kernels) is not installed")
    checkpoint = _two_layer_gptq(base_model_path, tmp_path_factory.mktemp("w4a16"))
    delete_applications(ray_head)
    sizes = log_sizes()
    started = time.monotonic()
    for app in start_app(ray_head, {
        "model": {"source": str(checkpoint), "served_name": SERVED},
        # Eager: no CUDA graph capture at start; the kernel choice is the same.
        "engine": {"w4a16_kernel": "humming", "gpu_memory_utilization": 0.25,
                   "enable_lora": False, "enforce_eager": True, "max_model_len": 1024},
        "adapters": {"allowed_roots": [], "declared": {}, "admin_token": ADMIN_TOKEN},
        "replicas": {"num_replicas": 1, "num_cpus": 1, "num_gpus": 0.4},
    }):
        print(f"app with Humming up in {time.monotonic() - started:.0f} s")
        yield app, set(kernels_logged(KERNEL_LOG, since=sizes))


def test_the_w4a16_checkpoint_runs_on_the_kernel_the_config_names(humming_app):
    app, kernels = humming_app
    r = httpx.post(f"{app.openai_url}/completions", timeout=120, json={
        "model": SERVED, "prompt": "The capital of France is", "max_tokens": 8,
        "temperature": 0, "ignore_eos": True})  # random weights: any tokens, but all 8
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    assert "HummingLinearKernel" in kernels, kernels
    assert "MacheteLinearKernel" not in kernels, kernels  # vLLM's own pick on Hopper
