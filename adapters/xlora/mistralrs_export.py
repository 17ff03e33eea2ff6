"""A peft X-LoRA checkpoint in the layout mistral.rs's X-LoRA loader reads.

mistral.rs 0.9.5 (`Which.XLora(xlora_model_id=DIR, order=FILE, model_id=BASE)`) does not
read peft's files; it lists DIR and takes:

- `xlora_config.json` (peft's X-LoRA options plus `base_model_id`): written from peft's
  `adapter_config.json`, with `base_model_id` set to the base path the replica passes as
  `model_id` (mistral.rs refuses to load unless the ordering file, this config and
  `model_id` name the same string), `use_bias: true` and `enable_relu_and_dropout: true`
  (peft's classifier always has a ReLU between its linear layers; mistral.rs only when
  told), `xlora_dropout_p: 0` (mistral.rs runs the classifier's dropout in training
  mode), and `xlora_size` = the model's hidden size (below).
- `xlora_classifier.safetensors`: peft's `internal_xlora_classifier.layers.{i}` linear
  layers renamed to `inner.0`, `inner.1`, ..., `last`. mistral.rs builds `last` (and the
  hidden layers after the first) with `hidden_size` inputs whatever `xlora_size` says,
  so a classifier narrower than the model is zero-padded to `hidden_size`: the extra
  units of each hidden layer get zero weights and bias, so they stay 0 through the ReLU
  and add nothing to the next layer. The classifier computes exactly peft's function.
- each expert's `adapter_config.json` and `adapter_model.safetensors`, linked at the top
  as `expert-0-adapter_config.json`, ...: mistral.rs lists a local directory without
  descending (peft's expert sub-directories are invisible to it), assigns every file
  whose name *contains* an expert's name to that expert and parses each non-safetensors
  one as a LoRA config, so peft's names "0", "1" would be ambiguous ("10" contains "1").

The ordering file (`ordering.json`) lists the experts in peft's order and numbers every
adapted module `model.layers.{l}.{self_attn|mlp}.{module}` in peft's order (layer by
layer, modules in registration order), which is the index layerwise scalings use.

mistral.rs's X-LoRA Llama also needs an `lm_head.weight` (it does not tie it to the
embeddings), so a base with tied embeddings is given a derived checkpoint directory
with it in a second weights shard (built once, cached like the export).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruvllm.adapters.xlora.checkpoint import read_checkpoint, xlora_spec
from ruvllm.atomic_dir import build_once

_MARKER = "ordering.json"
_MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                  "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp",
                  "down_proj": "mlp"}


@dataclass(frozen=True)
class MistralRsXLora:
    """What `Which.XLora` takes: the converted directory, its ordering file, the base
    checkpoint (`model_id`) and the options mistral.rs takes outside the config."""

    xlora_dir: Path
    order_file: Path
    base_dir: Path
    n_experts: int


def expert_name(index: int) -> str:
    # No name may be a substring of another's file names (see the module docstring).
    return f"expert-{index}-"


def export_for_mistralrs(xlora_path: Path | str, base_path: Path | str, out_root: Path | str,
                         overrides: dict[str, Any] | None = None) -> MistralRsXLora:
    """The converted checkpoint for `xlora_path` on base `base_path` (cached by content)."""
    xlora_path, base_path, out_root = Path(xlora_path), Path(base_path), Path(out_root)
    base_dir = _base_with_lm_head(base_path, out_root)
    base_config = json.loads((base_path / "config.json").read_text())
    ckpt = read_checkpoint(xlora_path, int(base_config["num_hidden_layers"]))
    spec = xlora_spec(ckpt, overrides or {})
    unsupported = mistralrs_limits(spec)
    if unsupported:
        raise ValueError(unsupported)
    hidden = int(base_config["hidden_size"])
    digest = hashlib.sha256(json.dumps(
        {"spec": spec, "base": str(base_dir), "xlora": str(xlora_path.resolve()),
         "mtime": max(p.stat().st_mtime for p in xlora_path.rglob("*.safetensors")),
         "format": 1}, sort_keys=True).encode()).hexdigest()[:12]
    target = out_root / f"{xlora_path.name}-{digest}"

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        names = [expert_name(i) for i in range(len(ckpt.experts))]
        for name, expert in zip(names, ckpt.experts):
            for file in ("adapter_config.json", "adapter_model.safetensors"):
                os.symlink((expert / file).resolve(), tmp / f"{name}{file}")
        save_file(classifier_tensors(ckpt.classifier, hidden),
                  str(tmp / "xlora_classifier.safetensors"))
        config = mistralrs_xlora_config(ckpt.config, spec, hidden, str(base_dir), names)
        (tmp / "xlora_config.json").write_text(json.dumps(config, indent=2))
        layers = {f"model.layers.{layer}.{_MODULE_PARENT[t]}.{t}": layer * len(ckpt.targets) + j
                  for layer in range(ckpt.num_layers) for j, t in enumerate(ckpt.targets)}
        order = {"order": names, "layers": layers, "base_model_id": str(base_dir)}
        (tmp / _MARKER).write_text(json.dumps(order, indent=2))

    build_once(target, _MARKER, build)
    return MistralRsXLora(target, target / _MARKER, base_dir, len(ckpt.experts))


def mistralrs_limits(spec: dict[str, Any]) -> str | None:
    """Why mistral.rs 0.9.5 cannot serve these X-LoRA options as peft does, or None."""
    if spec["enable_softmax_topk"]:
        return ("enable_softmax_topk: mistral.rs 0.9.5's X-LoRA classifier refuses it "
                "(\"`enable_softmax_topk` is not implemented\")")
    if spec["non_granular"]:
        return ("non_granular: mistral.rs's non-granular mode (tgt_non_granular_index) "
                "freezes the scalings after a fixed token count, not at the prompt's end as "
                "ruvllm's non_granular does; serve it with backend vllm")
    return None


def mistralrs_xlora_config(peft_config: dict[str, Any], spec: dict[str, Any], hidden: int,
                           base_model_id: str, names: list[str]) -> dict[str, Any]:
    """mistral.rs's XLoraConfig for a peft X-LoRA config and the resolved options."""
    return {
        "hidden_size": hidden,
        "base_model_id": base_model_id,
        "adapters": names,
        "layerwise_scalings": spec["layerwise_scalings"],
        "xlora_depth": spec["classifier"]["depth"],
        # Every hidden layer is padded to the model's width (classifier_tensors).
        "xlora_size": hidden,
        "xlora_dropout_p": 0.0,
        "enable_relu_and_dropout": True,
        "enable_softmax": spec["enable_softmax"],
        "softmax_temperature": spec["softmax_temperature"],
        "scaling_pass_value": spec["scaling_pass_value"],
        "use_trainable_adapters": bool(peft_config.get("use_trainable_adapters", False)),
        "use_bias": True,
        "global_scaling_weight": spec["global_scaling_weight"],
        "top_k_lora": spec["top_k_lora"],
        "enable_softmax_topk": False,
    }


def classifier_tensors(classifier: dict[str, Any], hidden: int) -> dict[str, Any]:
    """peft's classifier layers (`{index}.weight|bias`, Linear layers at the even indices
    of its Sequential) as mistral.rs's `inner.{i}` / `last`, hidden layers zero-padded
    to `hidden` units."""
    import torch

    indices = sorted({int(k.split(".")[0]) for k in classifier})
    out: dict[str, Any] = {}
    for n, index in enumerate(indices):
        weight = classifier[f"{index}.weight"].float()
        bias = classifier[f"{index}.bias"].float()
        is_last = n == len(indices) - 1
        if n > 0 and weight.shape[1] < hidden:  # input: the previous layer's padded units
            weight = torch.nn.functional.pad(weight, (0, hidden - weight.shape[1]))
        if not is_last:
            if weight.shape[0] > hidden:
                raise ValueError(f"X-LoRA classifier layer of {weight.shape[0]} units is wider "
                                 f"than the model ({hidden}); mistral.rs 0.9.5 sizes its "
                                 "classifier's later layers by the model's hidden size")
            weight = torch.nn.functional.pad(weight, (0, 0, 0, hidden - weight.shape[0]))
            bias = torch.nn.functional.pad(bias, (0, hidden - bias.shape[0]))
        name = "last" if is_last else f"inner.{n}"
        out[f"{name}.weight"] = weight.contiguous()
        out[f"{name}.bias"] = bias.contiguous()
    return out


def _base_with_lm_head(base_path: Path, out_root: Path) -> Path:
    """`base_path` when its weights hold `lm_head.weight`, else a derived directory: the
    base's files linked, its one weights file linked as the first of two shards and a
    second shard holding only `lm_head.weight`, a copy of the tied embeddings (mistral.rs
    loads every `model-N-of-M.safetensors`; 113 MB here instead of a copy of the model)."""
    from safetensors import safe_open

    files = sorted(base_path.glob("*.safetensors"))
    keys = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys |= set(f.keys())
    config = json.loads((base_path / "config.json").read_text())
    if "lm_head.weight" in keys or [f.name for f in files] != ["model.safetensors"]:
        return base_path.resolve()
    key = hashlib.sha256(f"{base_path.resolve()}:{files[0].stat().st_mtime_ns}:"
                         f"{(base_path / 'config.json').stat().st_mtime_ns}".encode()
                         ).hexdigest()[:12]
    target = out_root / "bases" / f"{base_path.name}-{key}"

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        for item in base_path.iterdir():
            if item.suffix != ".safetensors" and item.name != "config.json":
                os.symlink(item.resolve(), tmp / item.name)
        os.symlink(files[0].resolve(), tmp / "model-00001-of-00002.safetensors")
        with safe_open(str(files[0]), framework="pt") as f:
            embedding = f.get_tensor("model.embed_tokens.weight")
        save_file({"lm_head.weight": embedding.contiguous()},
                  str(tmp / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
        # mistral.rs reads rope_theta at the top level only (deployments/mistralrs_model).
        theta = (config.get("rope_parameters") or {}).get("rope_theta")
        if "rope_theta" not in config and theta is not None:
            config["rope_theta"] = theta
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    build_once(target, "config.json", build)
    return target
