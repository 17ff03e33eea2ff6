"""What `engine.dtype: auto` resolves to on CPU (deployments/vllm_engine.py): float32,
but bfloat16 for a W8A8 int8 checkpoint where vLLM-CPU would run it on its AMX int8 kernel.
tests/e2e/test_isq_serving.py serves such a variant for real on whatever CPU runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ruvllm.deployments.vllm_engine import cpu_auto_dtype, has_int8_activations

INT8_ACTIVATIONS = {"type": "int", "num_bits": 8, "dynamic": True, "strategy": "token"}


def checkpoint(tmp_path: Path, name: str, groups: dict | None) -> Path:
    d = tmp_path / name
    d.mkdir()
    config = {"architectures": ["LlamaForCausalLM"]}
    if groups is not None:
        config["quantization_config"] = {"quant_method": "compressed-tensors",
                                         "config_groups": groups}
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture
def kinds(tmp_path):
    return {
        "w8a8": checkpoint(tmp_path, "w8a8", {"group_0": {
            "weights": {"num_bits": 8}, "input_activations": INT8_ACTIVATIONS}}),
        "w4a16": checkpoint(tmp_path, "w4a16", {"group_0": {
            "weights": {"num_bits": 4}, "input_activations": None}}),
        "fp8": checkpoint(tmp_path, "fp8", {"group_0": {
            "weights": {"num_bits": 8, "type": "float"},
            "input_activations": {"type": "float", "num_bits": 8}}}),
        "plain": checkpoint(tmp_path, "plain", None),
        "missing": tmp_path / "nowhere",
    }


def test_only_int8_activations_count(kinds):
    assert {k: has_int8_activations(p) for k, p in kinds.items()} == {
        "w8a8": True, "w4a16": False, "fp8": False, "plain": False, "missing": False}


@pytest.mark.parametrize("amx", [True, False])
def test_w8a8_runs_in_bfloat16_only_where_amx_would_take_it(kinds, monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    got = {k: cpu_auto_dtype(p) for k, p in kinds.items()}
    assert got.pop("w8a8") == ("bfloat16" if amx else "float32")
    assert set(got.values()) == {"float32"}
