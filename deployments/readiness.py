"""The one line that tells an operator the app can take requests.

`serve run cluster.yaml` prints "Submitted deploy config successfully." and then only
the replicas' own logs: Serve announces nothing when a config file's application
becomes RUNNING. The placement controller knows when every engine the config asks for
has built its engine and reported, and it hands their capacity to the ingress in the
same `sync` call, so it prints the ready line then, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

from ruvllm.adapters.placement import ReplicaReport
from ruvllm.config import AppConfig, ReplicaConfig

READY_PREFIX = "ruvllm is ready:"


def _expected(replicas: ReplicaConfig) -> int:
    a = replicas.autoscaling
    if a is None:
        return replicas.num_replicas
    return a.initial_replicas if a.initial_replicas is not None else a.min_replicas


@dataclass
class ReadyAnnouncement:
    """Expected engine replicas per pool (None: the base model's replicas; else a
    dedicated model's name) and whether the line was printed already."""

    model: str
    expected: dict[str | None, int]
    announced: bool = field(default=False)

    @classmethod
    def for_config(cls, config: AppConfig) -> "ReadyAnnouncement":
        expected: dict[str | None, int] = {None: _expected(config.replicas)}
        for dedicated in [*config.xlora, *config.quantized]:
            expected[dedicated.name] = _expected(dedicated.replicas)
        return cls(config.model.name, expected)

    def line(self, reports: Iterable[ReplicaReport]) -> str | None:
        """The ready line the first time every pool has its replicas reporting; else None."""
        if self.announced:
            return None
        live: dict[str | None, int] = {}
        for report in reports:
            live[report.dedicated] = live.get(report.dedicated, 0) + 1
        if any(live.get(pool, 0) < n for pool, n in self.expected.items()):
            return None
        self.announced = True
        pools = [f"{self.model!r} on {live.get(None, 0)} engine replica(s)"]
        pools += [f"{pool!r} on {live[pool]}" for pool in sorted(p for p in live if p)]
        return f"{READY_PREFIX} {', '.join(pools)}; OpenAI API at /v1"


def announce(logger: logging.Logger, line: str) -> None:
    """Log the ready line and push it out at once. Serve's high-throughput mode
    (RAY_SERVE_THROUGHPUT_OPTIMIZED) buffers a replica's log records in a MemoryHandler
    that writes them only per 1,000 records or on an ERROR, and turns the console copy
    off: on an H200 the line sat in the controller's buffer, never reaching its file,
    and a benchmark waiting for it timed out with the app serving."""
    logger.info(line)
    for handler in logger.handlers:
        handler.flush()


def health(base_model: str, capacity: dict[str | None, int],
           dedicated: Iterable[str]) -> tuple[int, dict]:
    """`GET /health`: 200 once an engine serving the base model has reported KV capacity,
    503 before (and again if every such engine is gone), so a load balancer or readiness
    probe sends no traffic that could only wait in the admission queue. The body names
    each model's state; a dedicated model still quantizing or loading does not hold the
    base back. `capacity` is the KV tokens last reported per pool (None: the base's)."""
    models = {base_model: capacity.get(None, 0) > 0}
    models.update({name: capacity.get(name, 0) > 0 for name in dedicated})
    ready = models[base_model]
    body = {"status": "ok" if ready else "starting",
            "models": {name: "ready" if up else "starting" for name, up in models.items()}}
    return (200 if ready else 503), body
