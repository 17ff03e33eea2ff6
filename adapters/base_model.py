"""What an adapter must agree with: the base checkpoint's linear layers and identity."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_LAYER_WEIGHT = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)\.weight$")


@dataclass(frozen=True)
class BaseModelInfo:
    """Shapes of the base model's per-layer linear modules, read from safetensors
    headers without loading any weight."""

    path: str
    num_layers: int
    # leaf module name (q_proj, down_proj, ...) -> (out_features, in_features)
    linear_shapes: dict[str, tuple[int, int]]
    # Names an adapter's `base_model_name_or_path` may use for this model.
    aliases: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_checkpoint(cls, path: Path | str, aliases: set[str] | None = None) -> "BaseModelInfo":
        from safetensors import safe_open

        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        shapes: dict[str, tuple[int, int]] = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    m = _LAYER_WEIGHT.match(key)
                    if not m or m.group(1) != "0":
                        continue
                    shape = f.get_slice(key).get_shape()
                    if len(shape) == 2:
                        leaf = m.group(2).rsplit(".", 1)[-1]
                        shapes[leaf] = (int(shape[0]), int(shape[1]))
        if not shapes:
            raise ValueError(f"{path}: no per-layer linear weights found in *.safetensors")
        names = {str(path), str(path.resolve()), path.name, *(aliases or set())}
        return cls(str(path), int(config["num_hidden_layers"]), shapes, frozenset(names))

    def matches(self, base_model_name_or_path: str | None) -> bool:
        if not base_model_name_or_path:
            return True  # nothing to compare; the shape checks still apply
        candidate = base_model_name_or_path.rstrip("/")
        return candidate in self.aliases or Path(candidate).name in self.aliases
