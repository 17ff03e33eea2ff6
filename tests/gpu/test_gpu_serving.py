"""The stack on one CUDA GPU, as a GPU user runs it: cluster-gpu.yaml's engine settings
(bfloat16, block size 16, CUDA graphs), LoRA adapters, an X-LoRA mixture, streaming under
load. Skipped, with the reason, where no GPU exists; `make test-gpu` runs them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import ROOT
from gpu_app import BASE, GPU_ADAPTERS, XLORA_NAME, needs_gpus, one_gpu_app  # noqa: F401

pytestmark = needs_gpus(1)

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _chat(app, model: str, **extra) -> httpx.Response:
    return httpx.post(f"{app.openai_url}/chat/completions", timeout=120, json={
        "model": model, "messages": FRANCE, "max_tokens": 24, "temperature": 0} | extra)


def test_paris_at_temperature_zero_in_bfloat16_on_the_gpu(one_gpu_app):
    r = _chat(one_gpu_app, BASE)
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"], r.json()
    stats = one_gpu_app.engine_stats(r.headers["x-ruvllm-replica"])
    assert stats["dtype"] == "bfloat16", stats
    assert stats["block_size"] == 16 and stats["gpu_ids"], stats
    assert stats["num_kv_blocks"] > 1000, stats  # sized from GPU memory, not the CPU setting


def test_streaming_with_usage(one_gpu_app):
    pieces, usage = [], None
    with httpx.stream("POST", f"{one_gpu_app.openai_url}/chat/completions", timeout=120, json={
            "model": BASE, "messages": FRANCE, "max_tokens": 24, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    pieces.append(chunk["choices"][0]["delta"].get("content") or "")
                usage = chunk.get("usage") or usage
    assert len(pieces) > 3 and "Paris" in "".join(pieces), pieces
    assert usage and usage["completion_tokens"] > 0


def test_sixty_four_concurrent_streams_all_complete(one_gpu_app):
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int, str]:
        chunks, finish = 0, ""
        async with client.stream("POST", f"{one_gpu_app.openai_url}/chat/completions", json={
                "model": BASE, "max_tokens": 64, "temperature": 0.7, "seed": i, "stream": True,
                "messages": [{"role": "user", "content": f"Tell a story about {i} cats."}]}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choice = (json.loads(line[6:])["choices"] or [{}])[0]
                    chunks += 1
                    finish = choice.get("finish_reason") or finish
            return r.status_code, chunks, finish

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run())
    assert all(status == 200 for status, _, _ in results), results
    assert all(chunks > 1 and finish in ("stop", "length") for _, chunks, finish in results)


def test_lora_adapters_load_change_outputs_and_evict(one_gpu_app):
    # An open question: the random adapters change its answer (Paris they all keep).
    colours = [{"role": "user", "content": "Name three colours."}]
    base = _chat(one_gpu_app, BASE, messages=colours).json()["choices"][0]["message"]["content"]
    outputs, replicas = {}, set()
    for name in GPU_ADAPTERS:  # three adapters through two slots: one eviction at least
        r = _chat(one_gpu_app, name, messages=colours)
        assert r.status_code == 200, r.text
        outputs[name] = r.json()["choices"][0]["message"]["content"]
        replicas.add(r.headers["x-ruvllm-replica"])
    assert all(text != base for text in outputs.values()), (base, outputs)
    assert len(set(outputs.values())) == len(GPU_ADAPTERS), outputs
    stats = [one_gpu_app.engine_stats(rid) for rid in replicas]
    assert sum(s["loads"] for s in stats) >= len(GPU_ADAPTERS), stats
    assert sum(s["evictions"] for s in stats) >= 1, stats
    again = _chat(one_gpu_app, GPU_ADAPTERS[0], messages=colours)  # evicted earlier: loads again, same answer
    assert again.json()["choices"][0]["message"]["content"] == outputs[GPU_ADAPTERS[0]]


def test_xlora_mixture_serves_on_the_gpu(one_gpu_app):
    r = httpx.post(f"{one_gpu_app.openai_url}/completions", timeout=120, json={
        "model": XLORA_NAME, "prompt": "def parse(line):\n    ", "max_tokens": 16,
        "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].strip()
    stats = one_gpu_app.engine_stats(r.headers["x-ruvllm-replica"])
    assert stats["dtype"] == "bfloat16" and stats["gpu_ids"], stats


@pytest.mark.parametrize("mode", ["eager", "cuda-graphs", "non-granular-cuda-graphs"])
def test_xlora_model_matches_peft_in_bfloat16_on_the_gpu(tmp_path, xlora_checkpoint,
                                                          base_model_path, one_gpu_app, mode):
    """vLLM's X-LoRA model (CUDA attention backend) against peft's XLoraModel, both bf16
    on the GPU, scored along vLLM's greedy path, eager and under torch.compile + CUDA
    graphs (where the first version parted from peft on every prompt). bf16 rounds
    differently in the two implementations' kernels, so where peft's top two tokens are
    nearly tied the two may pick differently (measured on an H200: one of 160 steps under
    CUDA graphs, at step 5 of a prompt); the bounds are on the log-probabilities of the
    same tokens and on how far behind peft's own choice vLLM's token is at such a step.
    Non-granular mode (decode-only steps captured as full graphs, without the scaling
    pass) against peft with the prompt end's scalings held, served without prefix
    caching."""
    out = tmp_path / "parity.json"
    run = subprocess.run(
        [sys.executable, "-m", "ruvllm.adapters.xlora.parity", "--xlora", str(xlora_checkpoint),
         "--base", str(base_model_path), "--prompts", "5", "--tokens", "32",
         "--dtype", "bfloat16", "--out", str(out)]
        + (["--cuda-graphs"] if "cuda-graphs" in mode else [])
        + (["--non-granular"] if mode.startswith("non-granular") else []),
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if run.returncode != 0:  # kept at once: a device run's time limit can cut pytest's summary
        _keep_text(run.stderr, f"xlora-parity-gpu-{mode}.stderr.txt")
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    _keep(out, f"xlora-parity-gpu-{mode}.json")
    assert report["device"] == "cuda" and report["dtype"] == "bfloat16"
    steps = [(a == b) for p in report["prompts"] for a, b in zip(p["vllm_tokens"], p["peft_tokens"])]
    assert sum(steps) >= 0.95 * len(steps), report
    for prompt in report["prompts"]:
        if not report["non_granular"]:
            assert prompt["identical_with_prefix_cache"], prompt
            assert prompt["prefix_cached_prompt_tokens"] >= 16, prompt
        assert prompt["max_disagreement_margin"] < 0.3, prompt
    # Measured on an H200 (vLLM 0.26), 5 prompts x 32 tokens: 0.18 at most granular, eager
    # and under graphs (the first version under graphs: 11.9); non-granular under graphs
    # 0.195 uncompiled, 0.277 with its real pass compiled (first compiled version: 24);
    # granular under graphs against peft's one-pass scoring (12-02): 157 / 160, 0.133.
    assert report["max_abs_logprob_diff"] < 0.3, report["max_abs_logprob_diff"]


def _keep(path: Path, name: str) -> None:
    """Copy a measurement to $RUVLLM_GPU_RESULTS (the GPU run's output folder), if set."""
    _keep_text(path.read_text(), name)


def _keep_text(text: str, name: str) -> None:
    target = os.environ.get("RUVLLM_GPU_RESULTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / name).write_text(text)
