"""Capacity shares between ingress replicas (router/capacity_shares.py): the pure split,
and the controller -> ClusterView -> admission path that carries it."""

from __future__ import annotations

import asyncio

import pytest

from ruvllm.admission.controller import AdmissionController
from ruvllm.router.capacity_shares import CapacityShares, fair_allocation
from ruvllm.config import AdmissionConfig

WEIGHTS = {"gold": 4.0, "silver": 2.0, "bronze": 1.0, "free": 1.0}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def shares_for(layout: dict[str, dict[str, float]], clock: Clock | None = None
               ) -> dict[str, float]:
    """`layout`: ingress -> tenant -> KV tokens (of 1,000) with one sequence (of 100)."""
    s = CapacityShares(WEIGHTS.__getitem__, timeout_s=5.0, clock=clock or Clock())
    for ingress, tokens in layout.items():
        s.update(ingress, {t: (n, 1) for t, n in tokens.items()})
    return s.shares(1000, 100)


def test_fair_allocation_is_weighted_and_gives_what_a_capped_tenant_leaves_to_the_rest():
    overloaded = fair_allocation({t: 10_000 for t in WEIGHTS}, WEIGHTS, 800)
    assert overloaded == pytest.approx({"gold": 400, "silver": 200, "bronze": 100, "free": 100})
    # gold asks for 100 only: the 300 it leaves go to the others by weight (2:1:1).
    capped = fair_allocation({"gold": 100, "silver": 10_000, "bronze": 10_000, "free": 10_000},
                             WEIGHTS, 800)
    assert capped == pytest.approx({"gold": 100, "silver": 350, "bronze": 175, "free": 175})
    assert fair_allocation({"gold": 50}, WEIGHTS, 800) == {"gold": 50}


def test_one_tenant_per_ingress_under_overload_gets_its_weight_not_an_equal_split():
    shares = shares_for({f"i{k}": {t: 10_000.0} for k, t in enumerate(WEIGHTS)})
    assert shares == pytest.approx({"i0": 0.5, "i1": 0.25, "i2": 0.125, "i3": 0.125})


def test_a_tenant_spread_over_ingresses_is_split_by_where_its_demand_is():
    shares = shares_for({"a": {"gold": 3000.0, "free": 5000.0}, "b": {"gold": 1000.0}})
    # gold 4/5 of 1000 = 800 (3:1 between a and b), free 200 at a.
    assert shares == pytest.approx({"a": 0.8, "b": 0.2})


def test_capacity_nobody_asks_for_is_split_equally_and_an_idle_ingress_keeps_a_floor():
    light = shares_for({"a": {"gold": 100.0}, "b": {}})
    assert light == pytest.approx({"a": 0.55, "b": 0.45})


def test_sequences_count_when_they_bind_before_kv_tokens():
    s = CapacityShares(WEIGHTS.__getitem__, timeout_s=5.0, clock=Clock())
    s.update("a", {"gold": (100, 80)})  # 10% of the tokens, 80% of the sequences each
    s.update("b", {"free": (100, 80)})
    assert s.shares(1000, 100) == pytest.approx({"a": 0.8, "b": 0.2})
    busy = shares_for({"a": {"gold": 10_000.0}, "b": {}})
    assert busy["b"] == pytest.approx(0.025 / 1.025) and sum(busy.values()) == pytest.approx(1)


def test_an_ingress_that_stops_syncing_loses_its_share():
    clock = Clock()
    s = CapacityShares(WEIGHTS.__getitem__, timeout_s=5.0, clock=clock)
    s.update("a", {"gold": (10_000, 1)})
    s.update("b", {"free": (10_000, 1)})
    assert s.share("a", 1000, 100) == pytest.approx(0.8)
    clock.now = 6.0
    s.update("a", {"gold": (10_000, 1)})
    assert s.shares(1000, 100) == {"a": 1.0} and s.share("b", 1000, 100) == 0.0


def test_admission_reports_admitted_and_waiting_demand_per_tenant():
    async def scenario():
        ctl = AdmissionController(AdmissionConfig(kv_fraction=1.0))
        ctl.set_capacity(kv_tokens=1000, max_seqs=10)
        held = await ctl.admit("gold", 600)
        waiting = asyncio.create_task(ctl.admit("free", 700))
        await asyncio.sleep(0.01)
        assert ctl.tenant_demand() == {"gold": (600, 1), "free": (700, 1)}
        held.release()
        (await asyncio.wait_for(waiting, 1)).release()
        assert ctl.tenant_demand() == {}

    asyncio.run(scenario())
