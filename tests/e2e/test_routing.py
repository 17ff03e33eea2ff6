"""Requests reach replicas through the queued-tokens router."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"


def test_replica_with_fewer_queued_tokens_wins(serve_app):
    serve_app.wait_idle()
    long_body = {"model": MODEL, "stream": True, "max_tokens": 1200, "ignore_eos": True,
                 "messages": [{"role": "user", "content": "Write a long essay."}]}
    short_body = {"model": MODEL, "max_tokens": 4,
                  "messages": [{"role": "user", "content": "Say hi."}]}
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{serve_app.openai_url}/chat/completions", json=long_body) as r:
            busy = r.headers["x-ruvllm-replica"]
            lines = r.iter_lines()  # keep a reference: dropping it closes the stream
            next(lines)
            served_by = [
                client.post(f"{serve_app.openai_url}/chat/completions", json=short_body)
                .headers["x-ruvllm-replica"]
                for _ in range(6)
            ]
    assert busy not in served_by, (busy, served_by)


def test_concurrent_load_spreads_over_both_replicas(serve_app):
    serve_app.wait_idle()
    async def one(client: httpx.AsyncClient, i: int) -> str:
        r = await client.post(f"{serve_app.openai_url}/chat/completions", json={
            "model": MODEL, "max_tokens": 48, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Count to {i}."}]})
        assert r.status_code == 200
        return r.headers["x-ruvllm-replica"]

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(12)))

    replicas = asyncio.run(run())
    counts = {r: replicas.count(r) for r in set(replicas)}
    assert len(counts) == 2, counts
    assert min(counts.values()) >= 4, counts  # balanced by queued tokens, not piled up


def test_a_burst_through_real_serve_splits_evenly():
    """Serve routes a burst in one step, with no callback in between (router_burst.py);
    charged only when Serve's routing future resolved, such bursts split 12 / 0, 11 / 1
    and 8 / 4 among 10 (2026-12-02, a 2-core host). Every burst must split 6 / 6."""
    probe = Path(__file__).with_name("router_burst.py")
    run = subprocess.run([sys.executable, str(probe), "6", "12"], capture_output=True,
                         text=True, timeout=180,
                         env={**os.environ, "RAY_SERVE_ENABLE_HA_PROXY": "0"})
    lines = [x for x in run.stdout.splitlines() if x.startswith("SPLITS ")]
    assert lines, run.stderr[-3000:]
    assert json.loads(lines[0].removeprefix("SPLITS ")) == [[6, 6]] * 6
