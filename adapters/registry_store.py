"""The adapter registry's state on disk, so that a restarted placement controller keeps
what its predecessor knew: the adapters registered at run time, the weights each name
stood for (replicas keep serving what they loaded under a name, so a name must keep
naming the same weights), and the registry's version.

The version matters as much as the adapters: an ingress refetches the registry only
when the controller's version differs from the one it last saw, so a counter that
restarted from zero could land on a stale ingress's number and leave it serving an old
adapter list. A restored registry's version is strictly above every version saved, and
every change is saved before it is answered.

One JSON file, replaced whole through `ruvllm.atomic_dir.write_text_atomic` (fsync'ed
before the rename): a crash leaves the previous state or the new one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruvllm.atomic_dir import write_text_atomic

logger = logging.getLogger("ray.serve")

FORMAT = 1


@dataclass
class RegisteredAdapter:
    path: str
    fingerprint: tuple


@dataclass
class RegistryState:
    version: int = 0
    adapters: dict[str, RegisteredAdapter] = field(default_factory=dict)
    retired: dict[str, tuple] = field(default_factory=dict)  # deleted name -> fingerprint


def fingerprint_from_json(value: Any) -> tuple:
    """`weights_fingerprint`'s tuple back from JSON's lists: (path, (size, mtime), ...)."""
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise ValueError(f"not a fingerprint: {value!r}")
    return (value[0], *[tuple(part) for part in value[1:]])


class RegistryStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> RegistryState:
        """The saved state; an empty one when there is none yet. A file that cannot be
        read, or does not parse (it cannot be half-written, so it was damaged or edited;
        it is moved aside), is logged, and the version restarts above any a running
        ingress could hold: the wall clock in milliseconds exceeds any count of changes."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return RegistryState()
        except (OSError, ValueError) as e:  # unreadable: permissions, I/O, not UTF-8
            return self._lost(e, "could not be read")
        try:
            return self._parse(json.loads(text))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            aside = self.path.with_name(f"{self.path.name}.bad-{int(time.time())}")
            try:
                self.path.rename(aside)
            except OSError:
                aside = None
            return self._lost(e, f"is damaged (kept as {aside})")

    def _lost(self, error: Exception, what: str) -> RegistryState:
        logger.error("adapter registry state %s %s: %s; adapters registered at run time "
                     "must be registered again", self.path, what, error)
        return RegistryState(version=time.time_ns() // 1_000_000)

    def save(self, state: RegistryState) -> None:
        write_text_atomic(self.path, json.dumps({
            "format": FORMAT,
            "version": state.version,
            "adapters": {name: {"path": a.path, "fingerprint": list(a.fingerprint)}
                         for name, a in sorted(state.adapters.items())},
            "retired": {name: list(f) for name, f in state.retired.items()},
        }, indent=1))

    @staticmethod
    def _parse(data: Any) -> RegistryState:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        version = data["version"]
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"version {version!r}")
        adapters = {}
        for name, entry in dict(data.get("adapters") or {}).items():
            if not isinstance(entry.get("path"), str):
                raise ValueError(f"adapter {name!r} has no path")
            adapters[str(name)] = RegisteredAdapter(
                entry["path"], fingerprint_from_json(entry.get("fingerprint")))
        retired = {str(name): fingerprint_from_json(f)
                   for name, f in dict(data.get("retired") or {}).items()}
        return RegistryState(version, adapters, retired)
