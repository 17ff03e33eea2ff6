"""The per-GPU engine-start lock: replicas given one GPU start their engines one after
the other; replicas on different GPUs, or on none, do not wait for each other."""

from __future__ import annotations

import asyncio

from ruvllm.deployments.gpu_start_lock import gpu_start_lock


async def _start(name: str, gpus: list[str], tmp_path, log: list[str], hold: asyncio.Event) -> None:
    async with gpu_start_lock(gpus, tmp_path):
        log.append(f"{name} in")
        await hold.wait()
        log.append(f"{name} out")


def test_a_second_replica_on_the_same_gpu_starts_after_the_first(tmp_path):
    async def scenario() -> list[str]:
        log: list[str] = []
        first_done, second_done = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(_start("first", ["0"], tmp_path, log, first_done))
        await asyncio.sleep(0.2)
        second = asyncio.create_task(_start("second", ["0"], tmp_path, log, second_done))
        await asyncio.sleep(0.3)
        assert log == ["first in"]  # the second waits while the first starts
        first_done.set()
        second_done.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        return log

    assert asyncio.run(scenario()) == ["first in", "first out", "second in", "second out"]


def test_replicas_on_other_gpus_or_none_do_not_wait(tmp_path):
    async def scenario() -> list[str]:
        log: list[str] = []
        held = asyncio.Event()
        first = asyncio.create_task(_start("gpu0", ["0"], tmp_path, log, held))
        await asyncio.sleep(0.2)
        never = asyncio.Event()
        never.set()
        await asyncio.wait_for(_start("gpu1", ["1"], tmp_path, log, never), 2)
        await asyncio.wait_for(_start("cpu", [], tmp_path, log, never), 2)
        held.set()
        await first
        return log

    assert asyncio.run(scenario()) == ["gpu0 in", "gpu1 in", "gpu1 out", "cpu in", "cpu out",
                                       "gpu0 out"]


def test_the_lock_is_released_when_the_start_fails(tmp_path):
    async def scenario() -> None:
        try:
            async with gpu_start_lock(["0"], tmp_path):
                raise RuntimeError("engine failed to start")
        except RuntimeError:
            pass
        async with asyncio.timeout(2):
            async with gpu_start_lock(["0"], tmp_path):
                pass

    asyncio.run(scenario())
