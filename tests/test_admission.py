"""Admission control logic: capacity from the engines, a bounded fair queue, deadlines
and per-tenant limits (pure asyncio; the e2e tests drive it through HTTP)."""

from __future__ import annotations

import asyncio

import pytest

from ruvllm.admission.controller import OVERFLOW_TENANT, AdmissionController, Rejected, TooLarge
from ruvllm.config import AdmissionConfig, TenantLimits


def controller(**overrides) -> AdmissionController:
    ctl = AdmissionController(AdmissionConfig(**{"kv_fraction": 1.0, **overrides}))
    return ctl


def test_requests_fitting_the_kv_budget_start_at_once_others_wait():
    async def scenario():
        ctl = controller()
        ctl.set_capacity(kv_tokens=1000, max_seqs=10)
        a = await ctl.admit("t", 600)
        waiting = asyncio.create_task(ctl.admit("t", 600))
        await asyncio.sleep(0.01)
        assert not waiting.done() and ctl.queued == 1
        a.release()
        b = await asyncio.wait_for(waiting, 1)
        assert ctl.inflight_tokens == 600 and ctl.queued == 0
        b.release()

    asyncio.run(scenario())


def test_max_num_seqs_bounds_concurrency():
    async def scenario():
        ctl = controller()
        ctl.set_capacity(kv_tokens=10**6, max_seqs=2)
        held = [await ctl.admit("t", 1) for _ in range(2)]
        third = asyncio.create_task(ctl.admit("t", 1))
        await asyncio.sleep(0.01)
        assert not third.done()
        held[0].release()
        (await asyncio.wait_for(third, 1)).release()

    asyncio.run(scenario())


def test_queue_bound_and_deadline_give_rejections_with_retry_after():
    async def scenario():
        ctl = controller(max_queue=1, queue_timeout_s=0.2)
        ctl.set_capacity(kv_tokens=100, max_seqs=1)
        held = await ctl.admit("t", 10)
        queued = asyncio.create_task(ctl.admit("t", 10))
        await asyncio.sleep(0.01)
        with pytest.raises(Rejected) as full:
            await ctl.admit("t", 10)
        assert full.value.reason == "queue_full" and full.value.retry_after_s >= 1
        with pytest.raises(Rejected) as late:
            await queued
        assert late.value.reason == "deadline"
        assert ctl.queued == 0
        held.release()

    asyncio.run(scenario())


def test_cancelled_waiter_leaves_the_queue_at_once():
    async def scenario():
        ctl = controller()
        ctl.set_capacity(kv_tokens=100, max_seqs=1)
        held = await ctl.admit("t", 10)
        waiter = asyncio.create_task(ctl.admit("t", 10))
        await asyncio.sleep(0.01)
        assert ctl.queued == 1
        waiter.cancel()
        await asyncio.sleep(0.01)
        assert ctl.queued == 0
        held.release()
        assert ctl.inflight_requests == 0

    asyncio.run(scenario())


def test_flooding_tenant_does_not_starve_a_light_one():
    async def scenario():
        ctl = controller(max_queue=50)
        ctl.set_capacity(kv_tokens=10**6, max_seqs=1)  # one at a time: pure queue order
        first = await ctl.admit("flood", 10)
        flood = [asyncio.create_task(ctl.admit("flood", 10)) for _ in range(30)]
        await asyncio.sleep(0.01)
        light = asyncio.create_task(ctl.admit("light", 10))
        await asyncio.sleep(0.01)
        order = []
        current = first
        for _ in range(3):
            current.release()
            await asyncio.sleep(0.01)
            granted = [t for t in flood + [light] if t.done() and t not in order]
            order += granted
            current = granted[0].result()
        assert light in order, "the light tenant must be served within a few grants"
        current.release()
        for t in flood:
            t.cancel()
        await asyncio.sleep(0.01)

    asyncio.run(scenario())


def test_full_queue_makes_room_for_another_tenant():
    async def scenario():
        ctl = controller(max_queue=4)
        ctl.set_capacity(kv_tokens=10**6, max_seqs=1)
        held = await ctl.admit("flood", 1)
        flood = [asyncio.create_task(ctl.admit("flood", 1)) for _ in range(4)]
        await asyncio.sleep(0.01)
        light = asyncio.create_task(ctl.admit("light", 1))
        await asyncio.sleep(0.01)
        assert not light.done(), "the light tenant got a queue place"
        pushed_out = [t for t in flood if t.done()]
        assert len(pushed_out) == 1 and isinstance(pushed_out[0].exception(), Rejected)
        # Equal shares so far, so the earlier waiter goes first; the light tenant next.
        held.release()
        await asyncio.sleep(0.01)
        granted = [t for t in flood if t.done() and not t.exception()]
        assert len(granted) == 1 and not light.done()
        granted[0].result().release()
        await asyncio.sleep(0.01)
        assert light.done() and light.exception() is None
        light.result().release()
        for t in flood:
            t.cancel()
        await asyncio.sleep(0.01)

    asyncio.run(scenario())


def test_tenant_limits_hold_back_only_that_tenant():
    async def scenario():
        ctl = controller(tenants={"capped": TenantLimits(max_concurrent=1),
                                  "metered": TenantLimits(tokens_per_minute=100)})
        ctl.set_capacity(kv_tokens=10**6, max_seqs=100)
        c1 = await ctl.admit("capped", 1)
        c2 = asyncio.create_task(ctl.admit("capped", 1))
        await asyncio.sleep(0.01)
        assert not c2.done()
        other = await asyncio.wait_for(ctl.admit("free", 1), 1)  # not blocked by "capped"
        with pytest.raises(TooLarge, match="budget"):  # no wait can help: not a 429
            await ctl.admit("metered", 101)
        m = await ctl.admit("metered", 80)
        m2 = asyncio.create_task(ctl.admit("metered", 80))
        await asyncio.sleep(0.01)
        assert not m2.done(), "the token budget refills over a minute"
        c1.release()
        (await asyncio.wait_for(c2, 1)).release()
        for h in (other, m):
            h.release()
        m2.cancel()
        await asyncio.sleep(0.01)

    asyncio.run(scenario())


def test_no_capacity_known_yet_means_wait_not_reject():
    async def scenario():
        ctl = controller()
        waiter = asyncio.create_task(ctl.admit("t", 10))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        ctl.set_capacity(kv_tokens=100, max_seqs=2)
        (await asyncio.wait_for(waiter, 1)).release()

    asyncio.run(scenario())


def test_a_request_that_can_never_fit_is_too_large_not_a_429():
    async def scenario():
        ctl = controller()
        ctl.set_capacity(kv_tokens=1000, max_seqs=10)
        with pytest.raises(TooLarge, match="can never fit"):
            await ctl.admit("t", 1001)
        # Capacity shrinks (a replica restarts): what fitted before waits for it.
        ctl.set_capacity(kv_tokens=500, max_seqs=5)
        waiter = asyncio.create_task(ctl.admit("t", 800))
        await asyncio.sleep(0.01)
        assert not waiter.done() and ctl.queued == 1
        ctl.set_capacity(kv_tokens=1000, max_seqs=10)
        (await asyncio.wait_for(waiter, 1)).release()

    asyncio.run(scenario())


def test_sequences_count_against_max_num_seqs():
    async def scenario():
        ctl = controller()
        ctl.set_capacity(kv_tokens=10**6, max_seqs=8)
        wide = await ctl.admit("t", 40, seqs=6)  # n = 6
        two = await asyncio.wait_for(ctl.admit("u", 10, seqs=2), 1)
        assert ctl.inflight_seqs == 8
        three = asyncio.create_task(ctl.admit("t", 10, seqs=3))
        await asyncio.sleep(0.01)
        assert not three.done(), "8 + 3 sequences exceed the engines' 8"
        wide.release()
        (await asyncio.wait_for(three, 1)).release()
        two.release()
        assert ctl.inflight_seqs == 0

    asyncio.run(scenario())


def test_tenant_table_stays_bounded_under_client_chosen_names():
    async def scenario():
        ctl = controller(max_tenants=3, tenants={"vip": TenantLimits(weight=2)})
        ctl.set_capacity(kv_tokens=10**6, max_seqs=100)
        for i in range(50):  # names rotated by a client: each comes and goes
            (await ctl.admit(f"name-{i}", 1)).release()
        assert len(ctl._tenants) <= 3
        held = [await ctl.admit(f"busy-{i}", 1) for i in range(3)]  # none idle now
        extra = [await ctl.admit(f"new-{i}", 1) for i in range(5)]
        assert {a.tenant for a in extra} == {OVERFLOW_TENANT}
        assert len(ctl._tenants) == 4  # the overflow entry, shared
        vip = await ctl.admit("vip", 1)  # a configured tenant keeps its own entry
        assert vip.tenant == "vip"
        for a in held + extra + [vip]:
            a.release()
        assert ctl.inflight_requests == 0

    asyncio.run(scenario())
