"""The vLLM X-LoRA model against peft's XLoraModel, same checkpoint, float32 on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_vllm_xlora_matches_peft(tmp_path, xlora_checkpoint, base_model_path):
    out = tmp_path / "parity.json"
    run = subprocess.run(
        [sys.executable, "-m", "ruvllm.adapters.xlora.parity", "--xlora", str(xlora_checkpoint),
         "--base", str(base_model_path), "--prompts", "5", "--tokens", "32", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert len(report["prompts"]) == 5
    for prompt in report["prompts"]:
        assert len(prompt["vllm_tokens"]) == 32
        assert prompt["identical_greedy"], prompt
        assert prompt["identical_with_prefix_cache"], prompt
        assert prompt["prefix_cached_prompt_tokens"] >= 32, prompt  # a real prefix hit
    assert report["max_abs_logprob_diff"] < 1e-2, report["max_abs_logprob_diff"]


def test_non_granular_mode_matches_peft_with_the_prompt_ends_scalings(tmp_path, xlora_checkpoint,
                                                                       base_model_path):
    """Non-granular mode: every generated token is mixed with the scalings of the
    prompt's last token. vLLM's decode-only steps skip the scaling pass (the path CUDA
    graphs capture on a GPU); peft is the reference with its classifier's output held at
    the prompt's end from there on."""
    out = tmp_path / "parity.json"
    run = subprocess.run(
        [sys.executable, "-m", "ruvllm.adapters.xlora.parity", "--xlora", str(xlora_checkpoint),
         "--base", str(base_model_path), "--prompts", "4", "--tokens", "24", "--non-granular",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["non_granular"] and len(report["prompts"]) == 4
    for prompt in report["prompts"]:
        assert len(prompt["vllm_tokens"]) == 24
        assert prompt["identical_greedy"], prompt
    # float32 on CPU, 2026-12-01, 4 prompts x 24 tokens: 1.8e-05 at most; granular peft
    # along the same tokens parts from them (greedy) at step 8 of the third prompt.
    assert report["max_abs_logprob_diff"] < 1e-2, report["max_abs_logprob_diff"]
