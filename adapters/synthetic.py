"""Small real LoRA adapters made with peft on CPU, for tests and benchmarks.

Each adapter is a genuine peft LoRA checkpoint with non-zero random A and B matrices
(peft's `init_lora_weights=False`), seeded, so every adapter changes the base model's
output in its own reproducible way. Making one takes about a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

DEFAULT_TARGETS = ("q_proj", "v_proj")


def make_lora_adapters(base_path: Path | str, out_root: Path | str, names: Sequence[str],
                       *, rank: int = 8, alpha: int = 16,
                       target_modules: Iterable[str] = DEFAULT_TARGETS,
                       base_model_name: str | None = None, seed: int = 0) -> list[Path]:
    """Write one adapter directory per name under `out_root`; returns their paths.
    Existing complete adapters are kept (so callers can cache them)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    paths = [out_root / name for name in names]
    missing = [(i, p) for i, p in enumerate(paths) if not (p / "adapter_model.safetensors").is_file()]
    if not missing:
        return paths
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    for i, path in missing:
        torch.manual_seed(seed + i)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                            init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        peft_model.peft_config["default"].base_model_name_or_path = (
            base_model_name or str(base_path))
        peft_model.save_pretrained(str(path))
        model = peft_model.unload()
    return paths
