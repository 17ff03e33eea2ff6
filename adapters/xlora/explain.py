"""Per-token expert weights of an X-LoRA mixture, for the `xlora_scalings` debug field.

vLLM runs the model in its engine-core process and returns only tokens, so the weights
the classifier chose are recomputed here, in the replica, from the same exported
weights: the scaling pass (the base model; `scaling_pass_value` 0 means no adapter) and
the classifier over prompt + completion, with the mixture's top-k and temperature. The
parity test shows the vLLM model computes the same scalings as peft, and so does this.

The weights reported for generated token k are the ones that produced it: the
scalings of the position before it (the last prompt token for the first one). In
non-granular mode every generated token reuses the last prompt token's scalings, and
that is what is reported. Layerwise scalings are averaged over the adapted modules;
`per_module` adds the full [module x expert] matrix per token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ruvllm.adapters.xlora.vllm_model import XLoraClassifier, XLoraMixer


class ScalingsExplainer:
    def __init__(self, model_dir: Path, expert_names: list[str] | None = None) -> None:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.spec = spec = config["xlora"]
        if float(spec.get("scaling_pass_value", 0.0)) != 0.0:
            raise ValueError("xlora_scalings supports scaling_pass_value 0 only")
        # The exported directory holds the base weights (model.safetensors) beside the
        # experts (xlora.safetensors); transformers loads the former as a plain Llama.
        self.base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, architectures=["LlamaForCausalLM"]).eval()
        own = load_file(str(Path(model_dir) / "xlora.safetensors"))
        self.classifier = XLoraClassifier(config["hidden_size"], spec).eval()
        for name, tensor in own.items():
            parts = name.split(".")
            if parts[1] == "classifier":
                getattr(self.classifier.layers[int(parts[2])], parts[3]).data.copy_(tensor)
        ones = torch.ones(spec["n_experts"])
        # Reported weights: after top-k (and its softmax), before each expert's LoRA
        # alpha/r and the global weight, so they read as mixing proportions.
        self.mixer = XLoraMixer({**spec, "global_scaling_weight": 1.0}, ones)
        self.expert_names = expert_names or [str(i) for i in range(spec["n_experts"])]

    @torch.no_grad()
    def explain(self, prompt_ids: list[int], output_ids: list[int],
                per_module: bool = False) -> dict[str, Any]:
        ids = prompt_ids + output_ids[:-1]  # the inputs that produced each output token
        hidden = self.base.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        scalings = self.classifier(hidden)  # [T, modules or 1, E]
        weights = self.mixer.weights(scalings)  # [T, modules or 1, E]
        first = len(prompt_ids) - 1
        rows = []
        for k in range(len(output_ids)):
            at = first if self.spec.get("non_granular") else first + k
            row: dict[str, Any] = {"weights": [round(float(w), 5) for w in weights[at].mean(0)]}
            if per_module:
                row["per_module"] = [[round(float(w), 5) for w in m] for m in weights[at]]
            rows.append(row)
        return {"experts": self.expert_names, "layerwise": bool(self.spec["layerwise_scalings"]),
                "non_granular": bool(self.spec.get("non_granular")), "tokens": rows}
