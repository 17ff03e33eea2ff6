"""What a mistral.rs replica loads, and the checkpoint directory it can read.

mistral.rs 0.9.5 reads `rope_theta` from the top level of `config.json`; transformers 5
writes it only inside `rope_parameters`, and mistral.rs then fails to load the model.
A checkpoint without the key is served from a derived directory in the cache: its
files linked, `config.json` rewritten with the key (built once, atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruvllm.atomic_dir import build_once

_ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                  "gemma": "Gemma", "gemma2": "Gemma2", "phi3": "Phi3", "phi": "Phi2",
                  "starcoder2": "Starcoder2", "mixtral": "Mixtral", "smollm3": "SmolLm3"}
_MARKER = "ruvllm-mistralrs.json"


@dataclass(frozen=True)
class MistralRsModel:
    """A Hugging Face checkpoint (optionally quantized in situ at load) or a GGUF file.
    `tokenizer_dir` is the HF checkpoint whose tokenizer and chat template the request
    checks use (the same files mistral.rs reads)."""

    tokenizer_dir: Path
    model_dir: Path | None = None
    gguf_file: Path | None = None
    in_situ: str | None = None

    def which(self, lora: "tuple[int, int] | None" = None) -> Any:
        """mistral.rs's model selection; `lora` = (max resident adapters, max rank) turns
        on its dynamic LoRA runtime, empty at start (adapters are loaded at run time)."""
        from mistralrs import Architecture, ModelDType, Which

        if self.gguf_file is not None:
            return Which.GGUF(quantized_model_id=str(self.gguf_file.parent),
                              quantized_filename=self.gguf_file.name,
                              tok_model_id=str(self.tokenizer_dir))
        config = json.loads((self.model_dir / "config.json").read_text())
        arch = _ARCHITECTURES.get(config.get("model_type"))
        arch = getattr(Architecture, arch) if arch else None
        if lora is not None:
            max_adapters, max_rank = lora
            return Which.Lora(model_id=str(self.model_dir), adapters=[], arch=arch,
                              dtype=ModelDType.F32, max_adapters=max_adapters, max_rank=max_rank)
        # float32, as the vLLM backend serves on CPU: the two stay comparable.
        return Which.Plain(model_id=str(self.model_dir), arch=arch, dtype=ModelDType.F32)

    def describe(self) -> str:
        if self.gguf_file is not None:
            return f"GGUF {self.gguf_file.name}"
        return f"{self.model_dir.name} ({'ISQ ' + self.in_situ if self.in_situ else 'float32'})"


def readable_checkpoint(model_dir: Path, cache_dir: Path) -> Path:
    """`model_dir` itself when mistral.rs can read its config, else a derived directory
    under `<cache>/mistralrs/` with a top-level `rope_theta`."""
    config = json.loads((model_dir / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if "rope_theta" in config or theta is None:
        return model_dir
    key = hashlib.sha256(f"{model_dir.resolve()}:{(model_dir / 'config.json').stat().st_mtime_ns}"
                         .encode()).hexdigest()[:16]
    target = cache_dir / "mistralrs" / f"{model_dir.name}-{key}"

    def build(tmp: Path) -> None:
        for item in model_dir.iterdir():
            if item.name != "config.json":
                os.symlink(item.resolve(), tmp / item.name)
        (tmp / "config.json").write_text(json.dumps({**config, "rope_theta": theta}, indent=2))
        (tmp / _MARKER).write_text(json.dumps({"source": str(model_dir.resolve())}))

    build_once(target, _MARKER, build)
    return target
