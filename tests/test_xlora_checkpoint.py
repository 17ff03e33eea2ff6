"""Reading the peft X-LoRA checkpoint and exporting it as a vLLM model directory."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

from ruvllm.adapters.registry import AdapterError
from ruvllm.adapters.xlora.checkpoint import export_for_vllm, read_checkpoint


def test_fixture_experts_learned_their_domains(xlora_checkpoint):
    report = json.loads((xlora_checkpoint / "fixture.json").read_text())
    assert [e["domain"] for e in report["experts"].values()] == ["python", "json", "prose"]
    for expert in report["experts"].values():  # on held-out text of its own domain
        assert expert["held_out_loss_trained"] < expert["held_out_loss_base"], expert


def test_checkpoint_is_read_with_its_experts_and_classifier(xlora_checkpoint):
    ckpt = read_checkpoint(xlora_checkpoint, num_layers=30)
    assert len(ckpt.experts) == 3 and ckpt.rank == 8
    assert ckpt.targets == ("q_proj", "v_proj", "down_proj")
    assert ckpt.n_modules == 90
    assert ckpt.classifier and all(s == 2.0 for s in ckpt.scales)  # alpha 16 / r 8


def test_export_stacks_experts_per_module(tmp_path, xlora_checkpoint, base_model_path):
    out = export_for_vllm(xlora_checkpoint, base_model_path, tmp_path, {"top_k_lora": 2})
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["XLoraLlamaForCausalLM"]
    assert config["xlora"]["top_k_lora"] == 2 and config["xlora"]["n_experts"] == 3
    with safe_open(str(out / "xlora.safetensors"), framework="pt") as f:
        assert list(f.get_slice("xlora.layers.0.q_proj.A").get_shape()) == [24, 576]
        assert list(f.get_slice("xlora.layers.29.down_proj.B").get_shape()) == [576, 24]
    assert (out / "model.safetensors").is_symlink()
    again = export_for_vllm(xlora_checkpoint, base_model_path, tmp_path, {"top_k_lora": 2})
    assert again == out
    with pytest.raises(ValueError, match="unknown X-LoRA option"):
        export_for_vllm(xlora_checkpoint, base_model_path, tmp_path, {"temperature": 2})


def test_broken_checkpoints_are_refused(tmp_path, xlora_checkpoint):
    copy = tmp_path / "ckpt"
    shutil.copytree(xlora_checkpoint, copy)
    shutil.rmtree(copy / "1")
    with pytest.raises(AdapterError, match="sub-directory per expert"):
        read_checkpoint(copy, 30)
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        read_checkpoint(tmp_path, 30)
