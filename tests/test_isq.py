"""ISQ pure logic: config validation, cache keys, checkpoint byte accounting, the gate."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from isq import checkpoint_bytes
from isq.job import IsqQualityError, cache_key, check_quality, result_dir
from ruvllm.config import AppConfig, ConfigError, IsqConfig


def app_with(isq: dict) -> AppConfig:
    return AppConfig.from_args({"quantized": [{"name": "q", "isq": isq}]})


@pytest.mark.parametrize("isq, field, words", [
    ({"method": "awq", "bits": 8}, "quantized.0.isq", "awq supports 4"),
    ({"method": "smoothquant", "bits": 4}, "quantized.0.isq", "smoothquant supports 8"),
    ({"method": "fp8", "group_size": 64}, "quantized.0.isq", "group_size"),
    ({"method": "rtn", "group_size": 50}, "quantized.0.isq", "multiple of 16"),
    ({"method": "rtn", "actorder": True}, "quantized.0.isq", "actorder"),
    ({"method": "gptq", "activation_bits": 8}, "quantized.0.isq", "activation_bits"),
    ({"method": "gptq", "bits": 8, "activation_bits": 8, "group_size": 64},
     "quantized.0.isq", "group_size"),
    ({"method": "gptq", "calibration": {"source": "/nonexistent.txt"}},
     "quantized.0.isq.calibration", "does not exist"),
    ({"method": "gptq", "max_perplexity_increase": 0}, "quantized.0.isq.max_perplexity_increase",
     "greater than 0"),
    ({"method": "int3"}, "quantized.0.isq.method", "awq"),
])
def test_invalid_combinations_name_the_field(isq, field, words):
    with pytest.raises(ConfigError) as e:
        app_with(isq)
    line = next(ln for ln in str(e.value).splitlines() if ln.strip().startswith(field))
    assert words in line, str(e.value)


def test_defaults_per_method():
    assert IsqConfig(method="smoothquant").describe() == "smoothquant W8A8"
    assert IsqConfig(method="fp8").describe() == "fp8 W8A8"
    assert IsqConfig(method="gptq").describe() == "gptq W4A16 g128"
    assert IsqConfig(method="rtn", group_size=-1).resolved_group_size is None
    assert not IsqConfig(method="rtn").needs_calibration
    assert IsqConfig(method="awq").needs_calibration


def test_gptq_act_order_is_on_unless_turned_off():
    assert IsqConfig(method="gptq").job_params()["actorder"] == "static"
    assert IsqConfig(method="gptq", bits=8, activation_bits=8).job_params()["actorder"] == "static"
    assert IsqConfig(method="gptq", actorder=False).job_params()["actorder"] is None
    assert IsqConfig(method="rtn").job_params()["actorder"] is None
    assert IsqConfig(method="awq").job_params()["actorder"] is None


def test_variant_names_must_not_clash():
    with pytest.raises(ConfigError, match="unique"):
        AppConfig.from_args({"quantized": [{"name": "smollm2-135m-instruct",
                                            "isq": {"method": "rtn"}}]})


def test_cache_key_covers_weights_params_and_calibration(tmp_path):
    a = IsqConfig(method="gptq", group_size=64)
    calib = [[1, 2, 3], [4, 5, 6]]
    key = cache_key("w" * 64, a, calib)
    assert key == cache_key("w" * 64, IsqConfig(method="gptq", group_size=64), calib)
    assert key != cache_key("v" * 64, a, calib)
    assert key != cache_key("w" * 64, IsqConfig(method="gptq", group_size=128), calib)
    assert key != cache_key("w" * 64, a, [[1, 2, 3]])
    # The gate's threshold is the deployment's, not the checkpoint's.
    assert key == cache_key("w" * 64, IsqConfig(method="gptq", group_size=64,
                                                max_perplexity_increase=0.01), calib)
    d = result_dir(tmp_path, "m", a, key)
    assert d.parent == tmp_path / "isq" and d.name.startswith("m-gptq-w4a16-g64-")


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    sizes = {"BF16": 2, "F32": 4, "I32": 4, "I8": 1}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_checkpoint_bytes_compare_linear_layers_and_the_whole(tmp_path):
    base, quant = tmp_path / "base", tmp_path / "quant"
    base.mkdir(), quant.mkdir()
    _write_safetensors(base / "model.safetensors", {
        "model.embed_tokens.weight": ("F32", [100, 64]),
        "model.layers.0.self_attn.q_proj.weight": ("F32", [64, 64]),
        "model.layers.0.mlp.down_proj.weight": ("F32", [64, 128]),
    })
    _write_safetensors(quant / "model.safetensors", {
        "model.embed_tokens.weight": ("BF16", [100, 64]),
        "model.layers.0.self_attn.q_proj.weight_packed": ("I32", [64, 8]),
        "model.layers.0.self_attn.q_proj.weight_scale": ("BF16", [64, 1]),
        "model.layers.0.mlp.down_proj.weight_packed": ("I32", [64, 16]),
        "model.layers.0.mlp.down_proj.weight_scale": ("BF16", [64, 2]),
    })
    b = checkpoint_bytes.compare(base, quant)
    assert b["base_bf16"] == 2 * (6400 + 4096 + 8192)  # counted at bf16, whatever is stored
    assert b["base_linear_bf16"] == 2 * (4096 + 8192)
    assert b["quantized_linear"] == 4 * 64 * 8 + 2 * 64 + 4 * 64 * 16 + 2 * 128
    assert b["quantized"] == b["quantized_linear"] + 2 * 6400
    assert b["linear_ratio"] == pytest.approx(b["quantized_linear"] / b["base_linear_bf16"])


def test_quality_gate_names_both_perplexities():
    isq = IsqConfig(method="rtn", max_perplexity_increase=0.1)
    check_quality({"base_perplexity": 10.0, "perplexity": 10.9,
                   "perplexity_increase": 0.09}, isq)
    with pytest.raises(IsqQualityError) as e:
        check_quality({"base_perplexity": 10.0, "perplexity": 12.5,
                       "perplexity_increase": 0.25}, isq)
    assert "10.000" in str(e.value) and "12.500" in str(e.value) and "+25.00%" in str(e.value)
    assert "max_perplexity_increase 0.1" in str(e.value)


def test_weight_only_schemes_need_a_kernel_this_cpu_may_lack():
    from isq.serving import WNA16_OP, serving_problem

    assert serving_problem(IsqConfig(method="gptq"), on_gpu=True) is None
    problem = serving_problem(IsqConfig(method="gptq"), on_gpu=False)
    if problem is not None:  # an AVX2-only CPU: the message says what to use instead
        assert WNA16_OP in problem and "activation_bits: 8" in problem
    assert serving_problem(IsqConfig(method="rtn", bits=8, activation_bits=8),
                           on_gpu=False) is None


def test_calibration_windows_are_memoised_per_weights_tokenizer_and_settings(tmp_path, monkeypatch):
    import isq.job as job
    from ruvllm.config import CalibrationConfig

    calls = []

    def fake_windows(base_dir, calibration):
        calls.append(calibration.samples)
        return [[calibration.samples, 1, 2]]

    monkeypatch.setattr(job, "calibration_windows", fake_windows)
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.json").write_text("{}")
    cache = tmp_path / "cache"
    small, large = CalibrationConfig(samples=8), CalibrationConfig(samples=16)

    assert job.memoised_calibration_windows(base, small, "w1", cache) == [[8, 1, 2]]
    assert job.memoised_calibration_windows(base, small, "w1", cache) == [[8, 1, 2]]
    assert calls == [8]  # the second call read the memo
    job.memoised_calibration_windows(base, large, "w1", cache)
    job.memoised_calibration_windows(base, small, "w2", cache)
    (base / "tokenizer.json").write_text('{"changed": true}')
    job.memoised_calibration_windows(base, small, "w1", cache)
    assert calls == [8, 16, 8, 8]
