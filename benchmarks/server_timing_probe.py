"""Where a loaded stack's time to first token goes: probe requests that read `Server-Timing`.

A load client (`vllm bench serve`) sees only TTFT. While it runs, a probe sends one short
streaming request per `period_s` next to the load and records the stack's own split of
the time before its reply head (ingress / admission / replica / hop,
deployments/server_timing.py) with the client's time to headers and to the first token.
Measured on an H200 at c=128 the stack's TTFT p50 was twice bare vLLM's while its TPOT was
lower (fewer sequences running, the rest waiting somewhere before the engine): the probe
says where. One probe request at a time adds one stream to the load.
"""

from __future__ import annotations

import threading

import httpx

from benchmarks.ttft_breakdown import PHASES, one_request
from benchmarks.ttft_breakdown import summarize as breakdown_summary


class LoadProbe:
    """`with LoadProbe(url, model):` around a load run; `.summary()` afterwards."""

    def __init__(self, url: str, model: str, period_s: float = 1.0, offset: int = 50_000):
        self._url, self._model, self._period_s = url, model, period_s
        self._offset = offset
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.rows: list[dict] = []
        self.errors = 0

    def __enter__(self) -> "LoadProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        with httpx.Client(timeout=300) as client:
            i = 0
            while not self._stop.wait(self._period_s):
                try:
                    self.rows.append(one_request(client, self._url, self._offset + i, self._model))
                except Exception:  # a probe that fails is counted, never fails the load run
                    self.errors += 1
                i += 1

    def summary(self) -> dict:
        return summarize(self.rows, self.errors)


def sequential(url: str, model: str, requests: int = 12, offset: int = 90_000) -> dict:
    """Concurrency 1: `requests` probes one after the other, after 3 warm-up requests."""
    with httpx.Client(timeout=300) as client:
        for i in range(3):
            one_request(client, url, offset + 1000 + i, model)
        return summarize([one_request(client, url, offset + i, model) for i in range(requests)])


def summarize(rows: list[dict], errors: int = 0) -> dict:
    """Medians (ms) of the client's times and of each Server-Timing phase, over the probes
    that got a first token (ttft_breakdown.summarize, which the c=1 breakdown uses too)."""
    done = [r for r in rows if r.get("ttft_ms") is not None]
    if not done:
        return {"probes": 0, "errors": errors}
    return {"probes": len(done), "errors": errors, **breakdown_summary(done)}


def describe(s: dict) -> str:
    """One line for a log or a report row."""
    if not s.get("probes"):
        return f"no probe answered ({s.get('errors', 0)} errors)"
    st = s.get("server_timing_ms", {})
    phases = ", ".join(f"{p} {st[p]:.1f}" for p in PHASES if p in st)
    return (f"{s['probes']} probes: headers {s['headers_ms']:.1f} ms, TTFT {s['ttft_ms']:.1f} ms"
            + (f"; Server-Timing medians (ms): {phases}" if phases else ""))
