"""The shared-core model of the 2-core CPU benchmark (benchmarks/sim/cores.py): how a
busy engine's share of its core follows the stack's work and the other engine's load,
and that simulated engines on one pool re-time each other (pure logic, simulated time)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from benchmarks.sim import clock
from benchmarks.sim.calibration import H200_8B
from benchmarks.sim.cores import CorePool, SharedCores
from benchmarks.sim.engine import Sequence, SimEngine

CORES = SharedCores(cores=2, overhead_per_step_s=0.0, overhead_per_seq_s=1.0)


def test_idle_cores_absorb_the_stack_and_busy_ones_split_it():
    assert CORES.speed([]) == 1.0
    # The other engine idle: its core takes the stack's work, this one steps as alone.
    assert CORES.speed([(1.0, 0.5)]) == 1.0
    assert CORES.speed([(1.0, 1.0)]) == 1.0
    # More stack work than the idle core holds spills onto the busy one.
    assert CORES.speed([(1.0, 3.0)]) == pytest.approx(2 / 4)
    # Both busy, equal loads: step = compute + overhead (what one stretch factor said).
    s = CORES.speed([(1.0, 0.31), (1.0, 0.31)])
    assert 1.0 / s == pytest.approx(1.31)
    # Unequal loads: one share for both, set by the total work.
    assert CORES.speed([(0.4, 0.24), (0.3, 0.08)]) == pytest.approx(2 / (2 + 0.6 + 0.08 / 0.3))
    assert CORES.overhead_s(3) == 3.0
    assert dataclasses.replace(CORES, overhead_per_step_s=0.5).overhead_s(3) == 3.5
    with pytest.raises(ValueError):
        CORES.speed([(1.0, 0.0)] * 3)


def test_engines_on_one_pool_slow_each_other_only_while_both_are_busy():
    # One step = 1 s of compute whatever the batch (prefill free), 1 s of stack work per
    # running sequence: alone an engine steps in 1 s, beside a busy one in 2 s.
    profile = dataclasses.replace(H200_8B, decode_base_s=1.0, decode_per_seq_s=0.0,
                                  decode_per_ctx_token_s=0.0, prefill_tokens_per_s=1e12)

    def seq(loop, tokens):
        return Sequence(chain=[], prompt_tokens=1, output_tokens=tokens, adapter=None,
                        first_token=loop.create_future(), done=loop.create_future())

    async def scenario():
        loop = asyncio.get_running_loop()
        pool = CorePool(CORES)
        a, b = SimEngine(profile, loop, pool), SimEngine(profile, loop, pool)
        with pytest.raises(ValueError):
            pool.join(object())  # a third engine has no core of its own
        first = seq(loop, 5)
        a.submit(first)
        await asyncio.sleep(2.0)
        second = seq(loop, 2)
        b.submit(second)
        return [await f for f in (first.first_token, second.first_token, second.done,
                                  first.done)]

    a_first, b_first, b_done, a_done = clock.run(scenario())
    assert a_first == pytest.approx(1.0)  # alone: the engine-alone step
    # From t=2 both are busy (2 s steps): b's prefill step ends at 4, its one decode at 6;
    # a made 1 decode step by t=2, 2 more by t=6, and its last alone again: t=7.
    assert b_first == pytest.approx(4.0)
    assert b_done == pytest.approx(6.0)
    assert a_done == pytest.approx(7.0)


def test_adapter_load_stall_takes_the_cores_share():
    profile = dataclasses.replace(H200_8B, decode_base_s=1.0, decode_per_seq_s=0.0,
                                  decode_per_ctx_token_s=0.0, prefill_tokens_per_s=1e12)

    async def scenario():
        loop = asyncio.get_running_loop()
        pool = CorePool(CORES)
        a, b = SimEngine(profile, loop, pool), SimEngine(profile, loop, pool)
        alone = a.stall(0.1)
        b.submit(Sequence(chain=[], prompt_tokens=1, output_tokens=50, adapter=None,
                          first_token=loop.create_future(), done=loop.create_future()))
        a.submit(Sequence(chain=[], prompt_tokens=1, output_tokens=50, adapter=None,
                          first_token=loop.create_future(), done=loop.create_future()))
        await asyncio.sleep(1.0)
        return alone, a.stall(0.1), SimEngine(profile, loop).stall(0.1)

    alone, shared, unpooled = clock.run(scenario())
    assert alone == pytest.approx(0.1)
    assert shared == pytest.approx(0.2)  # both busy: half a core each
    assert unpooled == pytest.approx(0.1)
