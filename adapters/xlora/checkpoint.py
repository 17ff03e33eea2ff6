"""Reading a peft X-LoRA checkpoint and exporting it as a vLLM model directory.

peft's `save_pretrained` writes the X-LoRA config and the classifier at the top of the
directory and each expert (a normal LoRA adapter) in a sub-directory named after it
("0", "1", ...). The export is the base checkpoint (linked, not copied) plus one
safetensors file with the experts stacked per module and the classifier, and a
config.json naming the out-of-tree architecture `XLoraLlamaForCausalLM` with an `xlora`
section (the mixing options, which a deployment may override).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruvllm.adapters.registry import AdapterError
from ruvllm.adapters.xlora.vllm_model import MODULE_ORDER
from ruvllm.atomic_dir import build_once

ARCHITECTURE = "XLoraLlamaForCausalLM"
_LORA_KEY = re.compile(r"layers\.(\d+)\.(?:.+\.)?([^.]+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_CLASSIFIER_KEY = re.compile(r"internal_xlora_classifier\.layers\.(\d+)\.(weight|bias)$")

# Options a deployment may override, with peft's names.
OPTION_KEYS = ("top_k_lora", "softmax_temperature", "global_scaling_weight",
               "enable_softmax_topk", "scaling_pass_value", "non_granular")


@dataclass
class XLoraCheckpoint:
    path: Path
    config: dict[str, Any]
    experts: list[Path]
    targets: tuple[str, ...]
    rank: int
    scales: list[float]
    num_layers: int
    classifier: dict[str, Any] = field(default_factory=dict)

    @property
    def n_modules(self) -> int:
        return self.num_layers * len(self.targets)


def read_checkpoint(path: Path | str, num_layers: int) -> XLoraCheckpoint:
    from safetensors import safe_open

    path = Path(path)
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterError(400, f"{path}: adapter_config.json is missing")
    config = json.loads(config_path.read_text())
    if str(config.get("peft_type", "")).upper() != "XLORA":
        raise AdapterError(400, f"{path}: not an X-LoRA checkpoint (peft_type "
                           f"{config.get('peft_type')!r})")
    names = list((config.get("adapters") or {}).keys())
    experts = [path / name for name in names]
    if not experts or not all((e / "adapter_config.json").is_file() for e in experts):
        raise AdapterError(400, f"{path}: expected one sub-directory per expert {names}")
    targets, ranks, scales = None, set(), []
    for expert in experts:
        c = json.loads((expert / "adapter_config.json").read_text())
        t = c["target_modules"]
        t = tuple(sorted(t if isinstance(t, list) else [m for m in MODULE_ORDER if re.search(t, m)]))
        if targets is not None and t != targets:
            raise AdapterError(400, f"{path}: experts target different modules ({targets} vs {t})")
        targets = t
        ranks.add(int(c["r"]))
        scales.append(float(c.get("lora_alpha", c["r"])) / float(c["r"]))
    if len(ranks) != 1:
        raise AdapterError(400, f"{path}: experts have different ranks {sorted(ranks)}")
    unknown = set(targets) - set(MODULE_ORDER)
    if unknown:
        raise AdapterError(400, f"{path}: unsupported X-LoRA target modules {sorted(unknown)}")
    classifier = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                m = _CLASSIFIER_KEY.search(key)
                if m:
                    classifier[f"{m.group(1)}.{m.group(2)}"] = f.get_tensor(key)
    if not classifier:
        raise AdapterError(400, f"{path}: no X-LoRA classifier weights found (peft 0.21 "
                           "saves none when experts are named like sequential layers, "
                           "e.g. '0', '1'; name them e.g. after their domains)")
    ordered = tuple(t for t in MODULE_ORDER if t in targets)
    return XLoraCheckpoint(path, config, experts, ordered, ranks.pop(), scales, num_layers,
                           classifier)


def xlora_spec(ckpt: XLoraCheckpoint, overrides: dict[str, Any]) -> dict[str, Any]:
    c = ckpt.config
    linear_layers = sorted({int(k.split(".")[0]) for k in ckpt.classifier})
    depth = len(linear_layers)
    size = int(ckpt.classifier[f"{linear_layers[0]}.weight"].shape[0]) if depth > 1 else 0
    spec = {
        "n_experts": len(ckpt.experts),
        "rank": ckpt.rank,
        "targets": list(ckpt.targets),
        "n_modules": ckpt.n_modules,
        "layerwise_scalings": bool(c.get("layerwise_scalings", False)),
        "enable_softmax": bool(c.get("enable_softmax", True)),
        "enable_softmax_topk": bool(c.get("enable_softmax_topk", False)),
        "softmax_temperature": float(c.get("softmax_temperature", 1.0)),
        "top_k_lora": c.get("top_k_lora"),
        "scaling_pass_value": float(c.get("scaling_pass_value", 0.0)),
        "global_scaling_weight": float(c.get("global_scaling_weight", 1.0)),
        "classifier": {"depth": depth, "size": size},
        "non_granular": False,
    }
    for key, value in overrides.items():
        if key not in OPTION_KEYS:
            raise ValueError(f"unknown X-LoRA option {key!r}; known: {OPTION_KEYS}")
        if value is not None:
            spec[key] = value
    return spec


def export_for_vllm(xlora_path: Path | str, base_path: Path | str, out_root: Path | str,
                    overrides: dict[str, Any] | None = None) -> Path:
    """A vLLM model directory for this X-LoRA checkpoint and options (cached by content)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_path, xlora_path = Path(base_path), Path(xlora_path)
    base_config = json.loads((base_path / "config.json").read_text())
    ckpt = read_checkpoint(xlora_path, int(base_config["num_hidden_layers"]))
    spec = xlora_spec(ckpt, overrides or {})
    digest = hashlib.sha256(json.dumps(
        {"spec": spec, "base": str(base_path.resolve()), "xlora": str(xlora_path.resolve()),
         "mtime": max(p.stat().st_mtime for p in xlora_path.rglob("*.safetensors"))},
        sort_keys=True).encode()).hexdigest()[:12]
    target = Path(out_root) / f"{xlora_path.name}-{digest}"

    def build(tmp: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        per_expert: list[dict[tuple[int, str, str], torch.Tensor]] = []
        for expert in ckpt.experts:
            found = {}
            with safe_open(str(expert / "adapter_model.safetensors"), framework="pt") as f:
                for key in f.keys():
                    m = _LORA_KEY.search(key)
                    if m:
                        found[(int(m.group(1)), m.group(2), m.group(3))] = f.get_tensor(key)
            per_expert.append(found)
        for layer in range(ckpt.num_layers):
            for t in ckpt.targets:
                a = [e[(layer, t, "A")] for e in per_expert]
                b = [e[(layer, t, "B")] for e in per_expert]
                tensors[f"xlora.layers.{layer}.{t}.A"] = torch.cat(a, dim=0).contiguous()
                tensors[f"xlora.layers.{layer}.{t}.B"] = torch.cat(b, dim=1).contiguous()
        for key, value in ckpt.classifier.items():
            tensors[f"xlora.classifier.{key}"] = value.contiguous()
        tensors["xlora.expert_scales"] = torch.tensor(ckpt.scales, dtype=torch.float32)
        save_file(tensors, str(tmp / "xlora.safetensors"))
        for item in base_path.iterdir():
            if item.name == "config.json" or item.name.startswith("ruvllm-"):
                continue
            os.symlink(item.resolve(), tmp / item.name)
        config = {**base_config, "architectures": [ARCHITECTURE], "xlora": spec}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    # Replicas of one mixture may start together: the lock makes one of them export.
    build_once(target, "config.json", build)
    return target


def mixture_checkpoint_dir(mixture: Any, config: Any) -> Path:
    """The peft X-LoRA checkpoint of mixture `mixture` (building the fixture on first use)."""
    from ruvllm.model_store import resolve_model

    if mixture.checkpoint == "builtin:fixture":
        from ruvllm.adapters.xlora.fixture import build_fixture

        cache = config.resolved_cache_dir
        return build_fixture(resolve_model(config.model.source, cache), cache_dir=cache)
    return Path(mixture.checkpoint).expanduser()


def mixture_model_dir(mixture: Any, config: Any) -> Path:
    """The vLLM model directory serving X-LoRA mixture `mixture` of app config `config`
    (building the fixture checkpoint and the export on first use; both are cached)."""
    from ruvllm.model_store import resolve_model

    cache = config.resolved_cache_dir
    base = resolve_model(config.model.source, cache)
    return export_for_vllm(mixture_checkpoint_dir(mixture, config), base,
                           cache / "xlora" / "exported", mixture.overrides())
