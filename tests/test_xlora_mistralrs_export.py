"""The peft -> mistral.rs X-LoRA conversion, as pure functions (no engine)."""

from __future__ import annotations

import pytest
import torch

from ruvllm.adapters.xlora.mistralrs_export import (classifier_tensors, expert_name,
                                             mistralrs_limits, mistralrs_xlora_config)


def _mistralrs_classifier(tensors: dict, x: torch.Tensor) -> torch.Tensor:
    """mistral.rs's XLoraClassifier forward (enable_relu_and_dropout, dropout p = 0)."""
    i = 0
    while f"inner.{i}.weight" in tensors:
        x = torch.relu(x @ tensors[f"inner.{i}.weight"].T + tensors[f"inner.{i}.bias"])
        i += 1
    return x @ tensors["last.weight"].T + tensors["last.bias"]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_padded_classifier_computes_peft_function(depth):
    torch.manual_seed(depth)
    hidden, size, experts = 24, 8, 3
    dims = [hidden] + [size] * (depth - 1) + [experts]
    layers: list[torch.nn.Module] = []
    for n in range(depth):
        layers.append(torch.nn.Linear(dims[n], dims[n + 1]))
        if n < depth - 1:
            layers.append(torch.nn.ReLU())
    peft = torch.nn.Sequential(*layers)  # peft's layout: Linear at even indices
    classifier = {k: v.detach() for k, v in peft.state_dict().items()}
    tensors = classifier_tensors(classifier, hidden)
    assert tensors["last.weight"].shape == (experts, hidden if depth > 1 else hidden)
    for i in range(depth - 1):
        assert tensors[f"inner.{i}.weight"].shape == (hidden, hidden)
    x = torch.randn(5, hidden)
    torch.testing.assert_close(_mistralrs_classifier(tensors, x), peft(x).detach(),
                               rtol=0, atol=1e-6)


def test_classifier_wider_than_the_model_is_refused():
    classifier = {"0.weight": torch.zeros(32, 16), "0.bias": torch.zeros(32),
                  "2.weight": torch.zeros(3, 32), "2.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="wider than the model"):
        classifier_tensors(classifier, 16)


def test_config_and_names():
    spec = {"layerwise_scalings": False, "classifier": {"depth": 2, "size": 128},
            "enable_softmax": True, "softmax_temperature": 0.5, "scaling_pass_value": 0.0,
            "global_scaling_weight": 1.0, "top_k_lora": None, "enable_softmax_topk": False,
            "non_granular": False}
    names = [expert_name(i) for i in range(11)]
    config = mistralrs_xlora_config({}, spec, 576, "/base", names)
    assert config["base_model_id"] == "/base" and config["adapters"] == names
    assert config["xlora_size"] == 576 and config["enable_relu_and_dropout"]
    assert config["xlora_dropout_p"] == 0.0 and config["softmax_temperature"] == 0.5
    # mistral.rs matches expert files by substring: no name may occur in another's files.
    for a in names:
        for b in names:
            assert a == b or a not in f"{b}adapter_model.safetensors"
    assert mistralrs_limits(spec) is None
    assert "enable_softmax_topk" in mistralrs_limits({**spec, "enable_softmax_topk": True})


def test_tied_base_gets_lm_head_in_a_second_shard(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ruvllm.adapters.xlora.mistralrs_export import _base_with_lm_head

    base = tmp_path / "base"
    base.mkdir()
    embedding = torch.randn(10, 4)
    save_file({"model.embed_tokens.weight": embedding}, str(base / "model.safetensors"))
    (base / "config.json").write_text(json.dumps({"rope_parameters": {"rope_theta": 5.0}}))
    (base / "tokenizer.json").write_text("{}")
    derived = _base_with_lm_head(base, tmp_path / "out")
    names = sorted(p.name for p in derived.iterdir())
    assert names == ["config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "tokenizer.json"]
    assert (derived / "model-00001-of-00002.safetensors").resolve() == \
        (base / "model.safetensors").resolve()  # linked, not copied
    with safe_open(str(derived / "model-00002-of-00002.safetensors"), framework="pt") as f:
        torch.testing.assert_close(f.get_tensor("lm_head.weight"), embedding)
    assert json.loads((derived / "config.json").read_text())["rope_theta"] == 5.0
    assert _base_with_lm_head(base, tmp_path / "out") == derived  # built once
    save_file({"model.embed_tokens.weight": embedding, "lm_head.weight": embedding.clone()},
              str(base / "model.safetensors"))
    assert _base_with_lm_head(base, tmp_path / "other") == base.resolve()
