"""The placement planner: replicate hot adapters, place new copies on the least-loaded
replica with a free slot, never plan over a wanted adapter (pure logic)."""

from ruvllm.adapters.placement import PlacementPlanner, ReplicaReport


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def report(rid: str, resident=(), slots=2, load=0.0) -> ReplicaReport:
    return ReplicaReport(replica_id=rid, resident=list(resident), slots=slots,
                         queued_tokens=load, kv_capacity_tokens=1000, max_num_seqs=8)


PATHS = {f"a{i}": f"/adapters/a{i}" for i in range(6)}


def test_hot_adapter_gets_a_copy_on_the_other_replica():
    clock = Clock()
    planner = PlacementPlanner(hot_requests_per_s=1.0, demand_window_s=10, replica_timeout_s=30,
                               clock=clock, preload_idle=False)
    planner.report(report("r1", ["a0"]), PATHS)
    planner.report(report("r2", []), PATHS)
    planner.record_demand({"a0": 5})  # 0.5 req/s: one copy is enough
    assert planner.report(report("r2", []), PATHS).load == []
    planner.record_demand({"a0": 30})  # 3.5 req/s: two copies (two replicas)
    plan = planner.report(report("r2", []), PATHS)
    assert plan.load == [("a0", "/adapters/a0")]
    assert planner.report(report("r1", ["a0"]), PATHS).load == []


def test_demand_expires_with_the_window():
    clock = Clock()
    planner = PlacementPlanner(1.0, 10, 30, clock=clock)
    planner.record_demand({"a1": 50})
    assert planner.rate("a1") == 5.0
    clock.now += 11
    assert planner.rate("a1") == 0.0


def test_new_copy_goes_to_the_least_loaded_replica_with_a_free_slot():
    clock = Clock()
    planner = PlacementPlanner(1.0, 10, 30, clock=clock, preload_idle=False)
    planner.report(report("busy", [], load=5000), PATHS)
    planner.report(report("idle", [], load=10), PATHS)
    planner.report(report("full", ["a2", "a3"], slots=2, load=0), PATHS)
    planner.record_demand({"a1": 5, "a2": 5, "a3": 5})
    assert planner.report(report("idle", [], load=10), PATHS).load == [("a1", "/adapters/a1")]
    assert planner.report(report("full", ["a2", "a3"], slots=2), PATHS).load == []


def test_silent_replicas_drop_out_of_table_and_capacity():
    clock = Clock()
    planner = PlacementPlanner(1.0, 10, replica_timeout_s=5, clock=clock)
    planner.report(report("r1", ["a0"]), PATHS)
    planner.report(report("r2", ["a0"]), PATHS)
    assert planner.table() == {"a0": ["r1", "r2"]}
    assert planner.capacity() == (2000, 16)
    clock.now += 3
    planner.report(report("r2", ["a0"]), PATHS)
    clock.now += 3
    assert planner.table() == {"a0": ["r2"]}
    assert planner.capacity() == (1000, 8)


def test_capacity_is_pooled_by_what_the_replicas_serve():
    planner = PlacementPlanner(1.0, 10, replica_timeout_s=30, clock=Clock())
    planner.report(report("r1"), PATHS)
    planner.report(report("r2"), PATHS)
    mix = report("x1", ["mix"])
    mix.dedicated = "mix"
    planner.report(mix, PATHS)
    # Base-model requests cannot run on the mixture's replica: not in the base pool.
    assert planner.capacity() == (2000, 16)
    assert planner.capacity("mix") == (1000, 8)
    assert planner.capacities() == {None: (2000, 16), "mix": (1000, 8)}


def test_first_copy_needs_a_free_slot_but_a_hot_copy_may_displace_an_idle_adapter():
    clock = Clock()
    planner = PlacementPlanner(1.0, 10, 30, clock=clock, preload_idle=False)
    planner.report(report("r1", ["a0"], slots=2), PATHS)
    # r2 is full of adapters nobody asked for in the window.
    planner.report(report("r2", ["a4", "a5"], slots=2), PATHS)
    planner.record_demand({"a1": 5})  # in demand, held nowhere: its request will load it
    assert planner.report(report("r2", ["a4", "a5"], slots=2), PATHS).load == []
    assert planner.report(report("r1", ["a0"], slots=2), PATHS).load == [("a1", "/adapters/a1")]
    planner.record_demand({"a0": 30})  # hot: a second copy may take r2's idle slot
    assert ("a0", "/adapters/a0") in planner.report(report("r2", ["a4", "a5"], slots=2),
                                                    PATHS).load


def test_free_slots_take_one_copy_of_each_adapter_nobody_holds_and_evict_nothing():
    clock = Clock()
    planner = PlacementPlanner(1.0, 10, 30, clock=clock)
    planner.report(report("r1", ["a0", "a1"], slots=2), PATHS)  # full
    planner.report(report("r2", ["a2"], slots=3), PATHS)
    planner.report(report("r3", [], slots=2), PATHS)
    mix = report("x1", [], slots=4)
    mix.dedicated = "mix"  # serves its own model: no base adapters
    planner.report(mix, PATHS)
    plans = {rid: planner.report(r, PATHS).load for rid, r in (
        ("r1", report("r1", ["a0", "a1"], slots=2)), ("r2", report("r2", ["a2"], slots=3)),
        ("r3", report("r3", [], slots=2)), ("x1", mix))}
    assert plans["r1"] == [] and plans["x1"] == []
    placed = [a for rid in ("r2", "r3") for a, _ in plans[rid]]
    assert sorted(placed) == ["a3", "a4", "a5"]  # each once, in the 4 free slots
    assert len(plans["r2"]) <= 2 and len(plans["r3"]) <= 2
