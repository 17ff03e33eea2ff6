"""Mixed-precision 4-bit ISQ end to end with the real toolkit and model: the job measures
each Linear layer's sensitivity on the calibration windows, keeps the most sensitive at
8 bits in the checkpoint it writes, reports which and what they cost in bytes, and the
same inputs built twice from scratch give the same checkpoint bytes. RTN with a tiny
calibration keeps it short (the quantization itself takes a second)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

pytestmark = pytest.mark.e2e

BASE = "smollm2-135m-instruct"


def test_mixed_precision_keeps_the_most_sensitive_layers_at_8_bits_and_repeats(
        base_model_path):
    from ruvllm.isq import checkpoint_bytes
    from ruvllm.isq.sensitivity import choose_kept
    from ruvllm.isq.job import (cache_key, memoised_calibration_windows, quantize, result_dir,
                         weights_digest)
    from ruvllm.config import IsqConfig, resolve_cache_dir

    cache = resolve_cache_dir(None)
    isq = IsqConfig.model_validate({
        "method": "rtn", "bits": 4, "group_size": 64, "num_cpus": 0,
        "mixed_precision": {"bits": 8, "fraction": 0.25, "sensitivity_windows": 2},
        "calibration": {"samples": 2, "seq_len": 32},
        "evaluation": {"windows": 1, "seq_len": 64, "out_of_distribution": False},
        "max_perplexity_increase": 10})

    weights = weights_digest(base_model_path)
    calibration = memoised_calibration_windows(base_model_path, isq.calibration, weights, cache)
    target = result_dir(cache, BASE, isq, cache_key(weights, isq, calibration))

    def build_fresh():
        shutil.rmtree(target, ignore_errors=True)  # this test owns this key: from scratch
        result = quantize(base_model_path, BASE, isq, cache)
        assert not result.reused and result.path == target and "-mixed8-" in target.name
        return result

    built = build_fresh()
    mixed = built.report["mixed_precision"]
    kept = mixed["kept"]
    assert kept and 0 < mixed["kept_weight_fraction"] <= 0.25
    assert "Fisher" in mixed["proxy"] and len(mixed["sensitivity"]) == 30 * 7
    # The kept layers are the job's measurement put through the rule: the most sensitive
    # per weight first, within the budget.
    sizes = {n[:-len(".weight")]: shape[0] * shape[1] for n, (_, shape) in
             checkpoint_bytes.tensors(base_model_path).items() if n.endswith("proj.weight")}
    assert kept == choose_kept(mixed["sensitivity"], sizes, 0.25)
    density = {n: s / sizes[n] for n, s in mixed["sensitivity"].items()}
    assert max(density, key=density.get) in kept
    left = [density[n] for n in density if n not in kept]
    assert sum(density[n] for n in kept) / len(kept) > sum(left) / len(left)

    # In the checkpoint: the kept layers in an 8-bit group, the rest at 4 bits.
    groups = json.loads((built.path / "config.json").read_text())[
        "quantization_config"]["config_groups"]
    bits = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
    assert sorted(bits[8]) == kept and bits[4] == ["Linear"]
    # Bytes: between all-4-bit (4.25/16 at g64) and that plus the kept share at 8 bits.
    ratio = built.report["bytes"]["linear_ratio"]
    assert ratio == pytest.approx((4.25 + 4 * mixed["kept_weight_fraction"]) / 16, rel=0.01)

    # Reproducible: the same inputs from scratch give the same bytes and the same choice.
    digest = hashlib.sha256((built.path / "model.safetensors").read_bytes()).hexdigest()
    again = build_fresh()
    assert again.report["mixed_precision"]["kept"] == kept
    assert hashlib.sha256((again.path / "model.safetensors").read_bytes()).hexdigest() == digest
