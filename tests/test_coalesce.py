"""Ready stream chunks travel as one item; nothing is lost, reordered, delayed or leaked."""

from __future__ import annotations

import asyncio

import pytest

from ruvllm.deployments.coalesce import coalesce_ready


async def _burst(n: int):
    for i in range(n):
        yield f"data: {i}\n\n"


def test_chunks_ready_together_are_joined_in_order():
    async def run():
        out = []
        async for item in coalesce_ready(_burst(50)):
            out.append(item)
            await asyncio.sleep(0.01)  # a consumer slower than the source
        return out

    out = asyncio.run(run())
    assert "".join(out) == "".join(f"data: {i}\n\n" for i in range(50))
    assert len(out) < 50  # joined, not one item per chunk


def test_a_slow_source_gets_every_chunk_through_alone_and_at_once():
    async def slow():
        for i in range(5):
            await asyncio.sleep(0.02)
            yield f"data: {i}\n\n"

    async def run():
        loop = asyncio.get_running_loop()
        started, seen = loop.time(), []
        async for item in coalesce_ready(slow()):
            seen.append((item, loop.time() - started))
        return seen

    seen = asyncio.run(run())
    assert [item for item, _ in seen] == [f"data: {i}\n\n" for i in range(5)]
    # Each arrives when it is made (not held back for company): the last by ~0.1 s.
    assert seen[-1][1] < 0.5


def test_closing_the_consumer_cancels_the_source():
    cancelled = asyncio.Event()

    async def endless():
        try:
            i = 0
            while True:
                await asyncio.sleep(0.001)
                i += 1
                yield f"data: {i}\n\n"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def run():
        stream = coalesce_ready(endless())
        await stream.__anext__()
        await stream.aclose()  # what a disconnected client's stream gets
        return cancelled.is_set()

    assert asyncio.run(run())


def test_a_failing_source_delivers_what_came_before_then_raises():
    async def failing():
        yield "data: 1\n\n"
        yield "data: 2\n\n"
        raise RuntimeError("engine died")

    async def run():
        got = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for item in coalesce_ready(failing()):
                got.append(item)
        return "".join(got)

    assert asyncio.run(run()) == "data: 1\n\ndata: 2\n\n"
