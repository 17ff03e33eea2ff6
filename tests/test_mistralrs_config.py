"""Backend choice per deployment (`engine.backend`) and mistral.rs quantized variants:
what the config accepts, what it refuses and how the refusal names the field."""

from __future__ import annotations

import json

import pytest

from ruvllm.deployments.mistralrs_model import readable_checkpoint
from ruvllm.config import AppConfig, ConfigError


def test_backend_defaults_to_vllm_and_old_kind_still_reads():
    assert AppConfig.from_args(None).engine.backend == "vllm"
    assert AppConfig.from_args({"engine": {"kind": "vllm"}}).engine.backend == "vllm"
    assert AppConfig.from_args({"engine": {"kind": "mistralrs"}}).engine.backend == "mistralrs"
    with pytest.raises(ConfigError, match="kind is the old name of backend"):
        AppConfig.from_args({"engine": {"kind": "vllm", "backend": "mistralrs"}})
    with pytest.raises(ConfigError, match="engine.backend"):
        AppConfig.from_args({"engine": {"backend": "llama.cpp"}})


def test_lora_with_mistralrs_is_accepted_and_vllm_arguments_are_not():
    # mistral.rs's dynamic LoRA runtime serves the base deployment's adapters
    # (tests/e2e/test_mistralrs_lora.py shows peft's outputs per adapter).
    engine = AppConfig.from_args({"engine": {"backend": "mistralrs", "enable_lora": True}}).engine
    assert engine.backend == "mistralrs" and engine.enable_lora
    with pytest.raises(ConfigError, match="extra_engine_args"):
        AppConfig.from_args({"engine": {"backend": "mistralrs",
                                        "extra_engine_args": {"swap_space": 1}}})


def _variant(**isq):
    return {"name": "v", "isq": isq, "engine": {"backend": "mistralrs"}}


def test_mistralrs_variant_per_deployment_beside_a_vllm_base_with_lora():
    config = AppConfig.from_args({
        "engine": {"enable_lora": True},
        "quantized": [_variant(in_situ="Q4K"), {**_variant(gguf=True), "name": "g"}]})
    q4k, gguf = config.quantized
    assert config.backend_of(None) == "vllm"
    assert config.backend_of(q4k) == config.backend_of(gguf) == "mistralrs"
    engine = config.engine_for(q4k)
    assert engine.backend == "mistralrs" and not engine.enable_lora
    assert q4k.isq.describe() == "mistral.rs ISQ Q4K"
    assert config.engine_for(None) is config.engine


@pytest.mark.parametrize("variant,message", [
    (_variant(in_situ="Q3_Z"), "in_situ"),
    (_variant(in_situ="Q4K", method="rtn"), "exactly one of"),
    (_variant(), "exactly one of"),
    (_variant(method="rtn"), "toolkit jobs"),
    ({"name": "v", "isq": {"in_situ": "Q8_0"}}, "needs engine.backend mistralrs"),
    ({"name": "v", "isq": {"gguf": True}}, "needs engine.backend mistralrs"),
    ({"name": "v", "isq": {"as_is": True}}, "needs engine.backend mistralrs"),
    (_variant(as_is=True, gguf=True), "exactly one of"),
])
def test_quantized_variant_fields_must_match_their_backend(variant, message):
    with pytest.raises(ConfigError, match=message):
        AppConfig.from_args({"quantized": [variant]})


def test_xlora_with_mistralrs_is_refused_clearly():
    # The limit it names is pinned by tests/e2e/test_xlora_mistralrs.py.
    with pytest.raises(ConfigError, match="served by vLLM only. mistral.rs 0.9.5 .*RoPE "
                       "positions length 1 does not match token count"):
        AppConfig.from_args({"xlora": [{"name": "m", "checkpoint": "builtin:fixture",
                                        "engine": {"backend": "mistralrs"}}]})


def test_checkpoint_without_top_level_rope_theta_gets_a_derived_dir(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(
        {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0}}))
    (model / "model.safetensors").write_bytes(b"weights")
    derived = readable_checkpoint(model, tmp_path / "cache")
    assert derived != model
    assert json.loads((derived / "config.json").read_text())["rope_theta"] == 100000.0
    assert (derived / "model.safetensors").read_bytes() == b"weights"
    assert readable_checkpoint(model, tmp_path / "cache") == derived  # built once
    # A config mistral.rs reads as it is is used in place.
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "rope_theta": 1.0}))
    assert readable_checkpoint(model, tmp_path / "cache") == model


def test_each_deployment_gets_the_engine_its_backend_names(base_model_path):
    from ruvllm.deployments.mistralrs_engine import MistralRsEngine
    from ruvllm.deployments.replica import QuantizedServing, make_engine
    from ruvllm.deployments.vllm_engine import VLLMEngine

    config = AppConfig.from_args({"engine": {"enable_lora": True}})
    assert isinstance(make_engine(config), VLLMEngine)
    variant = make_engine(config, quantized=QuantizedServing(
        "q", str(base_model_path), backend="mistralrs", in_situ="Q4K"), threads=1)
    assert isinstance(variant, MistralRsEngine)
    assert variant._model.in_situ == "Q4K" and not variant._config.enable_lora
    base = make_engine(AppConfig.from_args({"engine": {"backend": "mistralrs"}}), threads=1)
    assert isinstance(base, MistralRsEngine) and base._model.in_situ is None
