"""Where a request's time went before its reply started, as a `Server-Timing` header.

The stack's time to first token is bare vLLM's plus what the ingress and Ray add (issue
15 measured +30 ms on CPU, issue 14 +16.5 ms on an H200). The header splits the part
the server can see, so an operator reads it with `curl -i` or a browser's devtools and a
benchmark can attribute the difference:

  ingress    parsing, validation, the prompt's chat template and token count
  admission  waiting for capacity (0 unless the cluster is full)
  replica    on the engine replica until its reply head: adapter load, vLLM's own
             validation, template and tokenization (bare vLLM does this part too)
  hop        the rest of dispatch: routing and Ray's transport to the replica and back

For a stream, the head comes before the first token, so prefill and the first chunk's
way back are not in it: the client's TTFT minus the sum is that part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RequestTimer:
    """Phase boundaries of one request on the ingress (perf_counter seconds)."""

    started: float = field(default_factory=time.perf_counter)
    prepared: float | None = None
    admitted: float | None = None

    def mark_prepared(self) -> None:
        self.prepared = time.perf_counter()

    def mark_admitted(self) -> None:
        self.admitted = time.perf_counter()

    def header(self, replica_s: float) -> str:
        """The header value once the replica's head arrived; `replica_s` is the time the
        replica reports it spent before sending that head."""
        now = time.perf_counter()
        prepared = self.prepared if self.prepared is not None else self.started
        admitted = self.admitted if self.admitted is not None else prepared
        dispatch = now - admitted
        replica = min(max(replica_s, 0.0), dispatch)
        phases = (("ingress", prepared - self.started), ("admission", admitted - prepared),
                  ("replica", replica), ("hop", dispatch - replica))
        return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in phases)


def parse(value: str) -> dict[str, float]:
    """`Server-Timing` header -> {phase: milliseconds} (for clients and benchmarks)."""
    phases: dict[str, float] = {}
    for entry in value.split(","):
        name, _, params = entry.strip().partition(";")
        for param in params.split(";"):
            key, _, number = param.strip().partition("=")
            if key == "dur":
                phases[name] = float(number)
    return phases
