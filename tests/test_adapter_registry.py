"""Adapter validation against the real base checkpoint, with real peft adapters."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ruvllm.adapters.base_model import BaseModelInfo
from ruvllm.adapters.registry import AdapterError, AdapterRegistry

BASE_NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def base(base_model_path) -> BaseModelInfo:
    return BaseModelInfo.from_checkpoint(
        base_model_path, {BASE_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct"})


@pytest.fixture
def root(tmp_path, adapter_root) -> Path:
    root = tmp_path / "root"
    shutil.copytree(adapter_root / "alpha", root / "alpha")
    return root


def registry(base, root, max_rank=16) -> AdapterRegistry:
    return AdapterRegistry(base, BASE_NAME, [root], max_lora_rank=max_rank)


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_base_model_info_reads_linear_shapes(base):
    assert base.num_layers == 30
    assert base.linear_shapes["q_proj"] == (576, 576)
    assert base.linear_shapes["k_proj"] == (192, 576)
    assert base.linear_shapes["down_proj"] == (576, 1536)


def test_valid_adapter_registers(base, root):
    reg = registry(base, root)
    spec = reg.register("alpha", "alpha")  # relative to the allowed root
    assert spec.rank == 8 and set(spec.target_modules) == {"q_proj", "v_proj"}
    assert spec.path == str((root / "alpha").resolve())
    assert reg.register("alpha2", str(root / "alpha")).name == "alpha2"  # absolute path
    with pytest.raises(AdapterError) as dup:
        reg.register("alpha", "alpha")
    assert dup.value.status == 409
    assert reg.unregister("alpha").name == "alpha"
    with pytest.raises(AdapterError) as gone:
        reg.unregister("alpha")
    assert gone.value.status == 404


@pytest.mark.parametrize("name", ["../alpha", "a/b", "", ".hidden", "x" * 65, BASE_NAME])
def test_bad_names_are_refused(base, root, name):
    with pytest.raises(AdapterError) as e:
        registry(base, root).register(name, "alpha")
    assert e.value.status in (400, 409)


def test_paths_must_stay_inside_the_roots(base, root, tmp_path):
    reg = registry(base, root)
    outside = tmp_path / "outside"
    shutil.copytree(root / "alpha", outside)
    os.symlink(outside, root / "sneaky")
    for path, status in [("../outside", 403), (str(outside), 403), ("sneaky", 403),
                         ("alpha/../../outside", 403), ("missing", 404)]:
        with pytest.raises(AdapterError) as e:
            reg.register("x", path)
        assert e.value.status == status, path


@pytest.mark.parametrize("change,message", [
    ({"r": 64}, "exceeds the engine's max_lora_rank"),
    ({"target_modules": ["q_proj", "nope_proj"]}, "do not exist in the base model"),
    ({"base_model_name_or_path": "meta-llama/Meta-Llama-3-8B"}, "trained for base model"),
    ({"peft_type": "IA3"}, "not a LoRA adapter"),
])
def test_incompatible_adapter_configs_are_refused(base, root, change, message):
    edit_config(root / "alpha", **change)
    with pytest.raises(AdapterError, match=message) as e:
        registry(base, root).register("alpha", "alpha")
    assert e.value.status == 400


def test_broken_files_are_refused(base, root):
    (root / "alpha" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="does not parse"):
        registry(base, root).register("alpha", "alpha")


def test_tensor_shapes_must_fit_the_base(base, root):
    import torch
    from safetensors.torch import save_file

    bad = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 999),
           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(576, 8)}
    save_file(bad, str(root / "alpha" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="has shape"):
        registry(base, root).register("alpha", "alpha")
    (root / "alpha" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="unreadable"):
        registry(base, root).register("alpha", "alpha")


def test_adapter_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(AdapterError(403, "outside the roots")))
    assert (e.status, e.message) == (403, "outside the roots")


def test_a_deleted_name_cannot_come_back_with_other_weights(base, root):
    """Replicas keep an adapter resident by name: other weights under a used name would
    be served as the old ones, so they are refused (409); the same weights may return."""
    shutil.copytree(root / "alpha", root / "alpha-v2")
    reg = registry(base, root)
    reg.register("alpha", "alpha")
    reg.unregister("alpha")
    with pytest.raises(AdapterError) as other:
        reg.register("alpha", "alpha-v2")
    assert other.value.status == 409 and "new name" in other.value.message
    assert reg.register("alpha", "alpha").name == "alpha"  # the same weights: fine
    assert reg.register("alpha-2", "alpha-v2").name == "alpha-2"
    reg.unregister("alpha")
    weights = root / "alpha" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes())  # rewritten in place
    os.utime(weights, ns=(1, 1))
    with pytest.raises(AdapterError) as rewritten:
        reg.register("alpha", "alpha")
    assert rewritten.value.status == 409
