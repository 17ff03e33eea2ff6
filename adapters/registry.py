"""LoRA adapters in peft format, validated before any replica sees them.

An adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`
under one of the configured allowed roots. Validation reads only JSON and safetensors
headers: the directory stays inside a root (no `..`, no symlink escape), the config is a
LoRA config whose rank fits `max_lora_rank`, every target module exists in the base
model, every tensor's shape agrees with the base layer it adapts, and the adapter names
a compatible base model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ruvllm.adapters.base_model import BaseModelInfo

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LORA_KEY = re.compile(r"layers\.(\d+)\.(?:.+\.)?([^.]+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class AdapterError(Exception):
    """A rejected adapter; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self):  # crosses Ray process boundaries as a return value
        return (AdapterError, (self.status, self.message))


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: str  # resolved, inside an allowed root
    rank: int
    target_modules: tuple[str, ...]
    base_model: str | None


def check_name(name: str, base_name: str) -> None:
    # fullmatch: `$` alone also matches before a trailing newline ("a\n" passed).
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise AdapterError(400, f"invalid adapter name {name!r}: use letters, digits, '.', "
                           "'_' or '-' (at most 64), starting with a letter or digit")
    if name == base_name:
        raise AdapterError(409, f"adapter name {name!r} is the base model's name")


def resolve_inside_roots(path: str, roots: Iterable[Path]) -> Path:
    """The adapter directory, resolved; refuses anything outside the allowed roots."""
    roots = [Path(r).expanduser().resolve() for r in roots]
    if not roots:
        raise AdapterError(403, "no adapter roots are configured (adapters.allowed_roots)")
    if not isinstance(path, str) or "\x00" in path:
        raise AdapterError(400, "adapter path must be a string without NUL characters")
    shown = path if len(path) <= 200 else f"{path[:200]}..."  # echoed in errors
    given = Path(path)
    if ".." in given.parts:
        raise AdapterError(403, f"adapter path {shown!r} contains '..'")
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for candidate in candidates:
        try:
            resolved = candidate.resolve()  # follows symlinks: an escaping link lands outside
            inside = any(resolved == root or root in resolved.parents for root in roots)
            if inside and not resolved.is_dir():
                raise AdapterError(404, f"adapter directory {shown!r} does not exist")
        except (OSError, RuntimeError) as e:  # too long a name; a symlink loop (Python <
            # 3.13 raises RuntimeError for it): both found by tests/test_fuzz_adapters.py
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise AdapterError(400, f"adapter path {shown!r} is unusable: {reason}") from None
        if inside:
            return resolved
    raise AdapterError(403, f"adapter path {shown!r} is outside the allowed roots")


def validate_adapter(name: str, path: str, roots: Iterable[Path], base: BaseModelInfo,
                     base_name: str, max_lora_rank: int) -> AdapterSpec:
    check_name(name, base_name)
    directory = resolve_inside_roots(path, roots)
    config = _read_config(directory)
    rank = config.get("r")
    if not _is_rank(rank):
        raise AdapterError(400, f"adapter {name!r}: adapter_config.json has no valid rank 'r'")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(_is_rank(r) for r in pattern.values()):
        raise AdapterError(400, f"adapter {name!r}: adapter_config.json's rank_pattern must "
                           "map module names to ranks")
    ranks = {rank, *pattern.values()}
    if max(ranks) > max_lora_rank:
        raise AdapterError(400, f"adapter {name!r}: rank {max(ranks)} exceeds the engine's "
                           f"max_lora_rank {max_lora_rank}")
    targets = _target_modules(name, config, base)
    base_model = config.get("base_model_name_or_path")
    if base_model is not None and not isinstance(base_model, str):
        raise AdapterError(400, f"adapter {name!r}: base_model_name_or_path is not a string")
    if not base.matches(base_model):
        raise AdapterError(400, f"adapter {name!r} was trained for base model "
                           f"{config.get('base_model_name_or_path')!r}, not this one "
                           f"({base_name})")
    _check_tensors(name, directory, base, ranks)
    return AdapterSpec(name, str(directory), max(ranks), targets,
                       config.get("base_model_name_or_path"))


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _read_config(directory: Path) -> dict:
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterError(400, f"{directory.name}: adapter_config.json is missing")
    if not (directory / "adapter_model.safetensors").is_file():
        raise AdapterError(400, f"{directory.name}: adapter_model.safetensors is missing")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, RecursionError, OSError) as e:  # JSON, UTF-8, nesting, I/O
        raise AdapterError(400, f"{directory.name}: adapter_config.json does not parse: {e}") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(400, f"{directory.name}: not a LoRA adapter (peft_type "
                           f"{config.get('peft_type') if isinstance(config, dict) else None!r})")
    return config


def _target_modules(name: str, config: dict, base: BaseModelInfo) -> tuple[str, ...]:
    targets = config.get("target_modules")
    if isinstance(targets, str):  # peft allows a regex over module paths
        try:
            pattern = re.compile(targets)
        except (re.error, RecursionError, OverflowError) as e:
            raise AdapterError(400, f"adapter {name!r}: target_modules {targets!r} is not a "
                               f"regular expression: {e}") from None
        matched = tuple(m for m in base.linear_shapes if pattern.search(m))
        if not matched:
            raise AdapterError(400, f"adapter {name!r}: target_modules {targets!r} matches "
                               "no module of the base model")
        return matched
    if (not isinstance(targets, list) or not targets
            or not all(isinstance(t, str) for t in targets)):
        raise AdapterError(400, f"adapter {name!r}: adapter_config.json lists no target_modules")
    unknown = sorted(set(targets) - set(base.linear_shapes))
    if unknown:
        raise AdapterError(400, f"adapter {name!r}: target modules {unknown} do not exist in "
                           f"the base model (it has {sorted(base.linear_shapes)})")
    return tuple(targets)


def _check_tensors(name: str, directory: Path, base: BaseModelInfo, ranks: set[int]) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    except (SafetensorError, OSError) as e:
        raise AdapterError(400, f"adapter {name!r}: adapter_model.safetensors is unreadable: {e}") from None
    lora_keys = [k for k in keys if _LORA_KEY.search(k)]
    if not lora_keys:
        raise AdapterError(400, f"adapter {name!r}: no LoRA tensors in adapter_model.safetensors")
    for key in lora_keys:
        layer, module, which = _LORA_KEY.search(key).groups()
        if int(layer) >= base.num_layers:
            raise AdapterError(400, f"adapter {name!r}: {key} adapts layer {layer}, but the "
                               f"base model has {base.num_layers}")
        if module not in base.linear_shapes:
            raise AdapterError(400, f"adapter {name!r}: {key} adapts unknown module {module!r}")
        out_features, in_features = base.linear_shapes[module]
        shape = shapes[key]
        ok = (len(shape) == 2 and (
            (which == "A" and shape[1] == in_features and shape[0] in ranks)
            or (which == "B" and shape[0] == out_features and shape[1] in ranks)))
        if not ok:
            expected = f"[r, {in_features}]" if which == "A" else f"[{out_features}, r]"
            raise AdapterError(400, f"adapter {name!r}: {key} has shape {list(shape)}, "
                               f"expected {expected} for this base model")


def weights_fingerprint(spec: AdapterSpec) -> tuple:
    """What identifies an adapter's weights without reading them: its directory and the
    size and modification time of its files."""
    files = [Path(spec.path) / n for n in ("adapter_config.json", "adapter_model.safetensors")]
    return (spec.path, *[(f.stat().st_size, f.stat().st_mtime_ns) for f in files])


class AdapterRegistry:
    """Known adapters by name. Declared ones come from the config; more are added at
    run time through the admin API.

    Replicas load an adapter once by its name and keep it resident (vLLM caches LoRA
    weights by name). So a name deleted and registered again must name the same weights:
    other weights under a used name (another directory, or its files rewritten) are
    refused with 409 rather than served as the old ones. Deleted names are remembered
    for the life of the registry, up to `_MAX_RETIRED` of them.
    """

    _MAX_RETIRED = 100_000

    def __init__(self, base: BaseModelInfo, base_name: str, roots: Iterable[Path],
                 max_lora_rank: int, max_adapters: int = 1000) -> None:
        self._base = base
        self._base_name = base_name
        self._roots = [Path(r) for r in roots]
        self._max_lora_rank = max_lora_rank
        self._max_adapters = max_adapters
        self._specs: dict[str, AdapterSpec] = {}
        self._fingerprints: dict[str, tuple] = {}
        self._retired: dict[str, tuple] = {}  # deleted name -> its weights' fingerprint
        self.version = 0

    def register(self, name: str, path: str, *, replace: bool = False) -> AdapterSpec:
        if name in self._specs and not replace:
            raise AdapterError(409, f"adapter {name!r} is already registered")
        if name not in self._specs and len(self._specs) >= self._max_adapters:
            raise AdapterError(409, f"adapter limit {self._max_adapters} reached")
        spec = validate_adapter(name, path, self._roots, self._base, self._base_name,
                                self._max_lora_rank)
        fingerprint = weights_fingerprint(spec)
        earlier = self._retired.get(name) or (self._fingerprints.get(name) if replace else None)
        if earlier is not None and earlier != fingerprint:
            raise AdapterError(409, f"adapter name {name!r} was used for other weights "
                               f"({earlier[0]}, possibly since rewritten), which replicas may "
                               "still hold under that name; register these under a new name")
        self._retired.pop(name, None)
        self._specs[name] = spec
        self._fingerprints[name] = fingerprint
        self.version += 1
        return spec

    def unregister(self, name: str) -> AdapterSpec:
        spec = self._specs.pop(name, None)
        if spec is None:
            raise AdapterError(404, f"adapter {name!r} is not registered")
        if len(self._retired) >= self._MAX_RETIRED:
            self._retired.pop(next(iter(self._retired)))
        self._retired[name] = self._fingerprints.pop(name)
        self.version += 1
        return spec

    def fingerprints(self) -> dict[str, tuple]:
        """Registered name -> the fingerprint of the weights it names."""
        return dict(self._fingerprints)

    def retired(self) -> dict[str, tuple]:
        """Deleted name -> the fingerprint of the weights it named."""
        return dict(self._retired)

    def retire(self, name: str, fingerprint: tuple) -> None:
        """Remember that `name` named these weights (a registry restored from disk: the
        names its predecessor used, which replicas may still hold)."""
        if name not in self._specs:
            self._retired[name] = tuple(fingerprint)

    def get(self, name: str) -> AdapterSpec | None:
        return self._specs.get(name)

    def snapshot(self) -> dict[str, AdapterSpec]:
        return dict(self._specs)
