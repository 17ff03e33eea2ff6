"""A small async load client for workloads `vllm bench serve` cannot express: requests
to many adapters with skewed popularity, and multi-turn chat sessions. It streams every
request and records time to first token, status, and the replica that served it."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Result:
    status: int
    ttft_s: float | None
    latency_s: float
    output_chunks: int
    replica: str | None
    model: str
    retry_after: str | None = None


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0

    @property
    def duration_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def ok(self) -> list[Result]:
        return [r for r in self.results if r.status == 200]

    def percentile_ttft_ms(self, p: float) -> float:
        values = sorted(r.ttft_s for r in self.ok() if r.ttft_s is not None)
        if not values:
            return float("nan")
        k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
        return values[k] * 1000

    def decode_interval_p50_ms(self) -> float:
        """Median over requests of the time between content chunks after the first (on a
        streamed request, one chunk per decode step of the engine serving it)."""
        values = sorted((r.latency_s - r.ttft_s) / (r.output_chunks - 1) for r in self.ok()
                        if r.ttft_s is not None and r.output_chunks > 1)
        return values[len(values) // 2] * 1000 if values else float("nan")

    def summary(self) -> dict[str, Any]:
        n = len(self.results)
        statuses: dict[str, int] = {}
        for r in self.results:
            statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        ok = self.ok()
        return {
            "requests": n,
            "statuses": statuses,
            "rejection_rate": statuses.get("429", 0) / n if n else 0.0,
            "errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
            "goodput_req_per_s": len(ok) / self.duration_s if self.duration_s else 0.0,
            "goodput_tok_per_s": sum(r.output_chunks for r in ok) / self.duration_s
            if self.duration_s else 0.0,
            "ttft_p50_ms": self.percentile_ttft_ms(50),
            "ttft_p90_ms": self.percentile_ttft_ms(90),
            "ttft_p99_ms": self.percentile_ttft_ms(99),
            "decode_interval_p50_ms": self.decode_interval_p50_ms(),
            "duration_s": self.duration_s,
        }


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any],
                      headers: dict[str, str] | None = None) -> tuple[Result, str]:
    """One streamed chat request; returns its result and the generated text."""
    started = time.monotonic()
    ttft, chunks, text = None, 0, []
    body = {**body, "stream": True}
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(r.status_code, None, time.monotonic() - started, 0, None,
                              body["model"], r.headers.get("retry-after")), ""
            replica = r.headers.get("x-ruvllm-replica")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Result(int(event["error"].get("code", 500)), ttft,
                                  time.monotonic() - started, chunks, replica, body["model"]), ""
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if ttft is None:
                            ttft = time.monotonic() - started
                        chunks += 1
                        text.append(piece)
        return Result(200, ttft, time.monotonic() - started, chunks, replica,
                      body["model"]), "".join(text)
    except httpx.HTTPError as e:
        return Result(599, None, time.monotonic() - started, 0, None, body["model"],
                      repr(e)), ""


def client(concurrency: int, timeout_s: float = 600) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    return httpx.AsyncClient(timeout=timeout_s, limits=limits)


async def bounded(concurrency: int, jobs: list) -> list:
    """Run coroutine factories with at most `concurrency` in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one(job):
        async with gate:
            return await job()

    return await asyncio.gather(*(one(j) for j in jobs))
