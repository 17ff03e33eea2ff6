"""Engines that share a machine's cores with the serving stack (the 2-core CPU benchmark).

Why: on router_bench's machine each vLLM-CPU engine's compute threads are bound to one of
the 2 cores (`cpu_threads_bind: spread`), but everything else — each engine's engine-core
loop and API process, the Serve replicas, ingress and proxy, the load client — runs on
whichever core the OS gives it. Measured: one engine alone, the other core free for those
processes, steps 216 ms + 14.2 ms per sequence (results/sim/cpu_engine); inside the stack
its decode interval is 1.31x the alone one at max_loras 4 and 1.89x at max_loras 8
(results/router/max_loras), while the stack's goodput does not move with max_loras. A
single stretch factor per engine cannot say what happens when one engine is busier than
the other (the placement-aware router sends 77% of the benchmark's requests to one
replica): the stack's work follows the requests, and an idle core takes it.

The model (fluid processor sharing, re-evaluated at every engine event):
- a busy engine's step needs `compute_s` on its own core (its engine-alone step time) and
  leaves `overhead_s` of stack work on the pool: `overhead_per_step_s` plus
  `overhead_per_seq_s` per running sequence (each one streams a token through the
  engine-core loop, the API process, the Serve replica, the ingress and the proxy);
- the OS spreads that work over the cores, so every busy engine's compute gets the same
  share `s` of its core, and a core whose engine is idle absorbs stack work first:
  `s = min(1, cores / (busy + sum(overhead_s / compute_s)))`. With every core's engine
  busy and equal batches this is step = compute + overhead (the single stretch it
  replaces); with the other engine idle the step is the engine-alone one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SharedCores:
    cores: int
    overhead_per_step_s: float  # stack CPU per engine step
    overhead_per_seq_s: float  # stack CPU per running sequence per step
    sources: dict[str, str] = field(default_factory=dict)

    def overhead_s(self, sequences: int) -> float:
        return self.overhead_per_step_s + self.overhead_per_seq_s * sequences

    def speed(self, loads: list[tuple[float, float]]) -> float:
        """Share of its core each busy engine's compute gets; `loads` is (compute_s,
        overhead_s) per busy engine, one engine per core."""
        if not loads:
            return 1.0
        if len(loads) > self.cores:
            raise ValueError(f"{len(loads)} busy engines on {self.cores} cores: one per core")
        demand = len(loads) + sum(o / c for c, o in loads)
        return min(1.0, self.cores / demand)


class _Engine(Protocol):
    def core_load(self) -> tuple[float, float] | None: ...
    def retime(self) -> None: ...


class CorePool:
    """The cores of one simulated machine, shared by its engines: an engine tells the pool
    when its load changes, and the pool re-times the others if their share moved."""

    def __init__(self, model: SharedCores) -> None:
        self.model = model
        self.engines: list[_Engine] = []
        self._speed = 1.0

    def join(self, engine: Any) -> None:
        if len(self.engines) >= self.model.cores:
            raise ValueError(f"more engines than the {self.model.cores} cores they are bound to")
        self.engines.append(engine)

    def speed(self) -> float:
        return self._speed

    def changed(self, source: Any) -> float:
        """Called by `source` after its load changed (and before it times its own step);
        returns the new share."""
        loads = [load for e in self.engines if (load := e.core_load()) is not None]
        speed = self.model.speed(loads)
        if speed != self._speed:
            self._speed = speed
            for engine in self.engines:
                if engine is not source:
                    engine.retime()
        return speed
