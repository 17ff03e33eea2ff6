"""The mistral.rs engine on its own (no Ray): a real Runner on the builtin model. What the
HTTP suite cannot see: that a cancelled stream stops mistral.rs's work, not only the
wrapper's bookkeeping (the process's CPU time goes idle)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

pytestmark = pytest.mark.e2e


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def chat_request(body: dict):
    """The body as the ingress hands it to an engine: parsed once into vLLM's model."""
    from ruvllm.deployments import vllm_compat
    from ruvllm.deployments.client_error import parse_request

    return parse_request(vllm_compat.chat_request_cls(), body)


@pytest.fixture(scope="module")
def engine(base_model_path):
    from ruvllm.deployments.mistralrs_engine import MistralRsEngine
    from ruvllm.deployments.mistralrs_model import MistralRsModel
    from ruvllm.config import EngineConfig

    config = EngineConfig(backend="mistralrs", max_num_seqs=4)
    engine = MistralRsEngine(MistralRsModel(base_model_path, base_model_path),
                             "m", config, threads=2)
    asyncio.run(engine.start())
    yield engine
    engine.shutdown()


def test_cancelled_stream_stops_the_engine_work(engine):
    body = {"model": "m", "stream": True, "max_tokens": 1500, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a very long story."}]}

    async def run() -> tuple[float, float, dict]:
        stream = engine.chat(chat_request(body), "r-cancel")
        events = []
        async for item in stream:
            events.append(item)
            if len(events) >= 6:
                break
        busy = engine.stats()
        await stream.aclose()  # what Serve does when the client goes away
        deadline = time.monotonic() + 10
        while engine.stats().unfinished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        before = _cpu_s()
        await asyncio.sleep(2.0)
        return busy.unfinished, (_cpu_s() - before) / 2.0, engine.stats()

    busy, cpu_per_s, after = asyncio.run(run())
    assert busy == 1
    assert after.unfinished == 0
    # 1500 tokens would keep ~2 cores busy for a minute; a stopped sequence leaves the
    # process idle (a little for the event loop and rayon's spinning workers).
    assert cpu_per_s < 0.3, f"engine still computing after the stream was dropped: {cpu_per_s}"


def test_chat_reply_and_usage(engine):
    async def run():
        return [item async for item in engine.chat(chat_request(
            {"model": "m", "max_tokens": 24, "temperature": 0, "messages": [
                {"role": "user", "content": "What is the capital of France?"}]}), "r-paris")]

    (head,) = asyncio.run(run())
    assert head.status == 200, head.body
    assert "Paris" in head.body["choices"][0]["message"]["content"]
    assert head.body["usage"]["completion_tokens"] > 0
    json.dumps(head.body)
