"""The cluster simulator's pieces (benchmarks/sim): simulated-time ordering, the engine
model, the trace format, and that a run drives the project's own router, planner,
admission controller and adapter slots (pure logic, no Ray cluster, no engine)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from ruvllm.adapters.slots import AdapterSlots
from benchmarks.sim import clock
from benchmarks.sim.calibration import H200_8B
from benchmarks.sim.engine import Sequence, SimEngine, chain_keys
from benchmarks.sim.simulation import SimConfig, Simulation
from benchmarks.sim.trace import TraceRequest, WorkloadSpec, generate, read, stable_hash, write
from ruvllm.admission.controller import AdmissionController
from ruvllm.adapters.placement import PlacementPlanner
from ruvllm.router.placement_router import PlacementAwareRouter
from ruvllm.config import AdmissionConfig


def test_simulated_time_runs_callbacks_in_time_order_then_fifo():
    async def scenario():
        loop = asyncio.get_running_loop()
        seen = []

        async def at(delay: float, name: str) -> None:
            await asyncio.sleep(delay)
            seen.append((name, loop.time()))

        await asyncio.gather(at(3600, "hour"), at(5, "b"), at(1, "a"), at(5, "c"))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.sleep(100), 10)  # a deadline in simulated time
        return seen, loop.time()

    seen, end = clock.run(scenario())
    assert seen == [("a", 1), ("b", 5), ("c", 5), ("hour", 3600)]
    assert end == 3610


def test_stalled_simulation_raises_instead_of_hanging():
    async def forever():
        await asyncio.get_running_loop().create_future()

    with pytest.raises(clock.Stalled):
        clock.run(forever())


def test_trace_round_trip_and_shorthand(tmp_path):
    spec = WorkloadSpec(sessions=20, adapters=10, duration_s=10, seed=4)
    trace = generate(spec)
    assert trace == generate(spec), "a spec and seed give the same trace"
    path = tmp_path / "t.jsonl"
    write(path, trace)
    assert read(path) == trace
    assert {r.adapter for r in trace} - {None} <= {f"lora{i:04d}" for i in range(10)}
    turns = [r for r in trace if r.session == trace[0].session]
    assert all(a.prompt == b.prompt[:len(a.prompt)] for a, b in zip(turns, turns[1:])), \
        "a later turn's prompt extends the earlier one (shared prefix)"

    path.write_text('{"t": 1.5, "prompt_tokens": 300, "output_tokens": 20}\n')
    (r,) = read(path)
    assert (r.prompt_tokens, r.max_tokens, r.adapter) == (300, 20, None)
    path.write_text('{"t": 1.5, "output_tokens": 20}\n')
    with pytest.raises(ValueError, match="line 1"):
        read(path)


def test_engine_times_one_request_from_the_profile_and_hits_its_cache():
    profile = dataclasses.replace(H200_8B, decode_per_seq_s=0.0, decode_per_ctx_token_s=0.0)
    prompt = [("sys/a", 1000), ("doc/1", 2000)]

    async def scenario():
        loop = asyncio.get_running_loop()
        engine = SimEngine(profile, loop)
        times = []
        for _ in range(2):
            seq = Sequence(chain=chain_keys(prompt, stable_hash), prompt_tokens=3000,
                           output_tokens=11, adapter=None, first_token=loop.create_future(),
                           done=loop.create_future())
            start = loop.time()
            engine.submit(seq)
            times.append((await seq.first_token - start, await seq.done - start))
        return times, engine.prefix_hits

    (first, second), hits = clock.run(scenario())
    # One step carries the whole 3,000-token prefill (under max_num_batched_tokens).
    assert first[0] == pytest.approx(profile.decode_base_s + 3000 / profile.prefill_tokens_per_s)
    assert first[1] - first[0] == pytest.approx(10 * profile.decode_base_s)
    assert second[0] < first[0] / 10, "the second request's prompt is all cached"
    assert hits == 2992  # whole 16-token blocks, never the last prompt token


def test_prefix_hits_are_attributed_to_leading_segments_by_kind():
    from benchmarks.sim.metrics import prefix_by_kind
    from benchmarks.sim.trace import tokens_by_kind

    prompt = [("sys/lora1", 400), ("doc/7", 1000), ("s1/u0", 50), ("s1/a0", 150),
              ("s1/u1", 60)]
    # 1,500 cached tokens: the system prompt, the document and 100 of the history.
    assert tokens_by_kind(prompt, 1500) == {
        "system prompt": (400, 400), "document": (1000, 1000),
        "conversation so far": (200, 100), "new message": (60, 0)}
    by_kind = prefix_by_kind([(prompt, 1500), ([("sys/base1", 200), ("s2/u0", 40)], 0)])
    assert by_kind["system prompt"]["hit_rate"] == pytest.approx(400 / 600)
    assert by_kind["new message"]["share"] == pytest.approx(100 / 1900)
    assert sum(k["hits_of_all"] for k in by_kind.values()) == pytest.approx(1500 / 1900)


def test_engine_counts_prefix_tokens_evicted_for_room():
    profile = dataclasses.replace(H200_8B, kv_tokens=4000)

    async def scenario():
        loop = asyncio.get_running_loop()
        engine = SimEngine(profile, loop)
        for i in range(3):  # 3 x 1,500 prompt tokens: the third evicts the first
            seq = Sequence(chain=chain_keys([(f"doc/{i}", 1500)], stable_hash),
                           prompt_tokens=1500, output_tokens=2, adapter=None,
                           first_token=loop.create_future(), done=loop.create_future())
            engine.submit(seq)
            await seq.done
        return engine.evicted_tokens

    assert clock.run(scenario()) == 1500


def test_a_run_drives_the_projects_router_planner_admission_and_slots(monkeypatch):
    calls: dict[str, int] = {}

    def spy(cls, name):
        original = getattr(cls, name)

        def wrapper(*args, **kwargs):
            calls[f"{cls.__name__}.{name}"] = calls.get(f"{cls.__name__}.{name}", 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    spy(PlacementAwareRouter, "rank")
    spy(PlacementAwareRouter, "on_request_completed")
    spy(PlacementPlanner, "report")
    spy(PlacementPlanner, "record_demand")
    spy(AdmissionController, "_grant")
    spy(AdapterSlots, "victims_for_one_more")

    trace = generate(WorkloadSpec(sessions=40, adapters=30, duration_s=5, seed=1))
    profile = dataclasses.replace(H200_8B, adapter_slots=4)
    sim = Simulation(SimConfig(policy="placement_aware", replicas=4, ingresses=2,
                               profile=profile), trace)
    result = clock.run(sim.run())

    assert result["completed"] == len(trace)
    for name in ("PlacementAwareRouter.rank", "PlacementAwareRouter.on_request_completed",
                 "AdmissionController._grant"):
        assert calls[name] == len(trace), name
    assert calls["PlacementPlanner.report"] > 0 and calls["PlacementPlanner.record_demand"] > 0
    assert calls["AdapterSlots.victims_for_one_more"] > 0, "30 adapters in 4 x 4 slots evict"
    assert result["adapter_loads"] > 0 and result["prefix_cache_hits"] > 0


def test_admission_rejections_are_recorded_not_raised():
    trace = [TraceRequest(t=0.0, prompt=[(f"p{i}", 500)], output_tokens=50, max_tokens=50,
                          tenant="t") for i in range(400)]
    cfg = SimConfig(policy="round_robin", replicas=1, profile=H200_8B,
                    admission=AdmissionConfig(max_queue=10, queue_timeout_s=1.0))
    result = clock.run(Simulation(cfg, trace).run())
    assert result["requests"] == 400
    assert 0 < result["rejection_rate"] < 1
    assert set(result["rejected_by_reason"]) <= {"queue_full", "deadline"}


def test_controller_capacity_shares_keep_tenants_fair_when_each_has_its_own_ingress():
    """Each tenant's requests reach one ingress: an equal static split gives every tenant
    a quarter; the controller's CapacityShares give each its weight (4/2/1/1)."""
    from benchmarks.sim.report import WEIGHTS, overload_trace, share_error
    from ruvllm.config import TenantLimits

    trace = overload_trace(replicas=1, seconds=20.0)
    admission = AdmissionConfig(tenants={t: TenantLimits(weight=w) for t, w in WEIGHTS.items()})
    errors = {}
    for split in ("static", "weighted"):
        cfg = SimConfig(policy="placement_aware", replicas=1, ingresses=4, profile=H200_8B,
                        admission=admission, ingress_spread="tenant", capacity_split=split,
                        warmup_s=5.0)
        errors[split], _ = share_error(clock.run(Simulation(cfg, trace).run()))
    assert errors["static"] > 0.15
    assert errors["weighted"] < 0.05


def test_validation_compares_the_simulation_with_the_median_of_the_real_runs():
    from benchmarks.sim.report import compare_with_bench

    def run(loads: int, goodput: float) -> dict:
        return {"adapter_loads": loads, "goodput_req_per_s": goodput}

    measured = {"power_of_two": run(206, 1.2), "placement_aware": run(33, 1.2),
                "runs": {"power_of_two": [run(206, 1.2), run(180, 1.0), run(190, 1.1)],
                         "placement_aware": [run(33, 1.2), run(62, 1.3), run(40, 1.0)]}}
    simulated = {"power_of_two": {"adapter_loads": 209, "completed_req_per_s": 1.1},
                 "placement_aware": {"adapter_loads": 50, "completed_req_per_s": 1.0}}
    rows = {r["what"]: r for r in compare_with_bench(simulated, measured)}
    p2c = rows["adapter loads, power_of_two"]
    assert (p2c["measured"], p2c["measured_min"], p2c["measured_max"], p2c["measured_runs"]) \
        == (190, 180, 206, 3)
    assert p2c["error"] == pytest.approx(209 / 190 - 1)
    assert rows["adapter loads, placement_aware"]["error"] == pytest.approx(50 / 40 - 1)
    assert rows["goodput req/s, placement_aware"]["measured"] == pytest.approx(1.2)
    ratio = rows["load reduction (x)"]
    assert ratio["measured"] == pytest.approx(190 / 40)
    assert (ratio["measured_min"], ratio["measured_max"]) == pytest.approx((180 / 62, 206 / 33))
    assert ratio["error"] == pytest.approx((209 / 50) / (190 / 40) - 1)
    # Without recorded repeats the one row is the measurement, as before.
    single = {k: v for k, v in measured.items() if k != "runs"}
    one = {r["what"]: r for r in compare_with_bench(simulated, single)}
    assert one["adapter loads, power_of_two"]["measured"] == 206
    assert one["adapter loads, power_of_two"]["measured_runs"] == 1


def _three_adapter_trace() -> list[TraceRequest]:
    return [TraceRequest(t=0.0, prompt=[(f"q{i}", 40)], output_tokens=8, max_tokens=8,
                         adapter=f"a{i % 3}", client=f"c{i % 4}", turn=i // 4,
                         think_s=0.0 if i >= 4 else None) for i in range(24)]


def test_startup_preloads_registered_adapters_before_traffic_and_does_not_count_them():
    """As router_bench measures it: the stack starts, the plan fills free slots with the
    registered adapters, and only then are the replicas' counters read. Three adapters
    fit two replicas x four slots, so a warm start serves every request from a resident
    adapter and counts no load; a cold start loads each one on its first request."""
    from ruvllm.config import PlacementConfig

    trace = _three_adapter_trace()
    profile = dataclasses.replace(H200_8B, adapter_slots=4)
    placement = PlacementConfig(hot_requests_per_s=1000.0)  # one copy each: no replication

    def run(startup_s: float) -> tuple[dict, Simulation]:
        sim = Simulation(SimConfig(policy="placement_aware", replicas=2, profile=profile,
                                   placement=placement, startup_s=startup_s), trace)
        return sim.execute(), sim

    warm, sim = run(10.0)
    assert sim.counters_at_warmup["plan_loads"] == 3  # done before time 0, not counted
    assert warm["adapter_loads"] == 0 and warm["adapter_hit_rate"] == 1.0
    assert warm["completed"] == len(trace)
    cold, sim = run(0.0)
    assert sim.counters_at_warmup.get("loads", 0) == 0
    assert cold["adapter_loads"] >= 3 and cold["adapter_hit_rate"] < 1.0


def test_a_simulation_with_startup_needs_its_clock_to_start_before_time_zero():
    sim = Simulation(SimConfig(policy="round_robin", replicas=1, profile=H200_8B,
                               startup_s=5.0), _three_adapter_trace())
    with pytest.raises(ValueError, match="startup_s"):
        clock.run(sim.run())


def test_a_replica_that_starts_later_finds_the_first_preloads_taken():
    """The first replica to report gets the plan's idle pre-loads all to itself (the
    planner knows no other replica yet); a replica up together with it shares them
    (router_bench's log: lora00-07 on one replica, 08-15 on the other, 7 s apart)."""
    from ruvllm.config import PlacementConfig

    trace = [TraceRequest(t=0.5, prompt=[("q", 40)], output_tokens=8, max_tokens=8,
                          adapter=f"a{i}") for i in range(8)]
    profile = dataclasses.replace(H200_8B, adapter_slots=4)

    def resident(stagger_s: float) -> list[list[str]]:
        sim = Simulation(SimConfig(policy="placement_aware", replicas=2, profile=profile,
                                   placement=PlacementConfig(hot_requests_per_s=1000.0),
                                   startup_s=10.0, replica_stagger_s=stagger_s), trace)
        result = sim.execute()
        assert result["adapter_loads"] == 0 and result["adapter_hit_rate"] == 1.0
        return [sorted(r.slots.resident()) for r in sim.replicas]

    assert resident(5.0) == [["a0", "a1", "a2", "a3"], ["a4", "a5", "a6", "a7"]]
    assert resident(0.0) == [["a0", "a2", "a4", "a6"], ["a1", "a3", "a5", "a7"]]


def test_cpu_profile_lines_come_from_the_probe_sweep():
    from benchmarks.sim.fit_cpu_step import engine_alone

    # step = 0.2 s + 0.01 s x b; b sequences started together: first tokens by 0.2 + 0.5 b
    sweep = {str(b): {"step_s": 0.2 + 0.01 * b, "ttft_max_s": 0.2 + 0.5 * b}
             for b in (1, 2, 4, 8, 16)}
    alone = engine_alone({"sweep_lora": sweep, "load": [0.03, 0.02, 0.05]})
    assert alone["decode_base_s"] == pytest.approx(0.2)
    assert alone["decode_per_seq_s"] == pytest.approx(0.01)
    assert alone["prefill_tokens_per_s"] == pytest.approx(40 / 0.5)
    assert alone["lora_load_s"] == pytest.approx(0.03)


def test_cpu_profile_in_calibration_matches_the_committed_measurements():
    """calibration.py's CPU numbers are what fit_cpu_step computes from the committed
    probe and router_bench results (they are copied there as plain numbers): the engine
    times are the engine alone's, and the shared cores' stack work gives the simulated
    router_bench the measured stretch over the simulated engine alone."""
    import json

    from benchmarks.sim.calibration import CPU_ENGINE_ALONE, CPU_SMOLLM2, CPU_STACK_STRETCH
    from benchmarks.sim.fit_cpu_step import (PROBE, STACK, engine_alone, simulate_probe_loop,
                                             simulate_stack)

    alone = engine_alone(json.loads(PROBE.read_text())["4"])
    for key, value in CPU_ENGINE_ALONE.items():
        assert value == pytest.approx(alone[key], rel=2e-3), key
        assert getattr(CPU_SMOLLM2, key) == value, key
    loop = json.loads(PROBE.read_text())["4"]["closed"]["decode_interval_p50_ms"]
    stack = json.loads((STACK / "power_of_two-max_loras4" / "report.json").read_text())
    assert CPU_STACK_STRETCH == pytest.approx(
        stack["adapters"]["power_of_two"]["decode_interval_p50_ms"] / loop, rel=1e-3)
    simulated_alone = simulate_probe_loop(dataclasses.replace(CPU_SMOLLM2, shared_cores=None),
                                          120)["decode_interval_s"]
    simulated_stack = simulate_stack(CPU_SMOLLM2)["decode_interval_s"]
    assert simulated_stack / simulated_alone == pytest.approx(CPU_STACK_STRETCH, rel=0.01)


def _cpu_like(**kw):
    from benchmarks.sim.calibration import CPU_SMOLLM2

    return dataclasses.replace(CPU_SMOLLM2, shared_cores=None, decode_base_s=0.2,
                               decode_per_seq_s=0.0, prefill_tokens_per_s=100.0, **kw)


_prompts = iter(range(10**6))


def _seq(loop, prompt_tokens=40, output_tokens=5):
    # each its own prompt: no prefix-cache hits
    return Sequence(chain=chain_keys([(f"p{next(_prompts)}", prompt_tokens)], stable_hash),
                    prompt_tokens=prompt_tokens, output_tokens=output_tokens, adapter=None,
                    first_token=loop.create_future(), done=loop.create_future())


def test_step_aligned_prefill_waits_for_the_running_step_and_batches_the_prompts():
    """As vLLM-CPU's step log showed (cpu_engine --arrivals): prompts arriving during a
    step go into the next one together, beside the decoding batch, first tokens at its end."""
    async def scenario():
        loop = asyncio.get_running_loop()
        engine = SimEngine(_cpu_like(step_aligned_prefill=True), loop)
        a = _seq(loop)
        engine.submit(a)  # idle engine: its own step, 0.2 + 40 / 100 s
        await asyncio.sleep(0.1)
        b, c = _seq(loop), _seq(loop)
        engine.submit(b)
        engine.submit(c)
        firsts = [await s.first_token for s in (a, b, c)]
        return firsts, [await s.done for s in (a, b, c)]

    firsts, dones = clock.run(scenario())
    assert firsts == pytest.approx([0.6, 1.6, 1.6])  # b, c: after a's step, 0.2 + 80 / 100
    # a decodes one token in b and c's step, then 3 more decode-only steps of 0.2 s
    assert dones == pytest.approx([2.2, 2.4, 2.4])


def test_fluid_prefill_is_kept_for_profiles_without_step_alignment():
    async def scenario():
        loop = asyncio.get_running_loop()
        engine = SimEngine(_cpu_like(step_aligned_prefill=False), loop)
        a = _seq(loop)
        engine.submit(a)
        await asyncio.sleep(0.1)
        b = _seq(loop)
        engine.submit(b)
        return [await s.first_token for s in (a, b)]

    first_a, first_b = clock.run(scenario())
    assert first_b < 1.6, "fluid: the second prompt starts before the first's step ends"


def test_step_aligned_prefill_chunks_a_prompt_over_the_token_budget():
    async def scenario():
        loop = asyncio.get_running_loop()
        engine = SimEngine(_cpu_like(step_aligned_prefill=True, max_num_batched_tokens=100),
                           loop)
        big = _seq(loop, prompt_tokens=250, output_tokens=2)
        engine.submit(big)
        return await big.first_token

    # 100 + 100 + 50 tokens in three steps: 3 x 0.2 + 250 / 100
    assert clock.run(scenario()) == pytest.approx(3.1)


def test_probe_step_log_reads_step_kinds_and_steps_to_first_token():
    from benchmarks.sim.cpu_engine_probe import step_composition

    # (frontend time, prompt requests, prompt tokens, decoding requests, model s)
    steps = [(1.0, 0, 0, 4, 0.20), (1.5, 2, 80, 4, 0.50), (1.7, 0, 0, 6, 0.21),
             (2.4, 1, 40, 6, 0.60)]
    requests = [{"submitted": 0.9, "first_token": 1.5}, {"submitted": 1.2, "first_token": 1.5},
                {"submitted": 1.6, "first_token": 2.4}]
    c = step_composition(steps, requests)
    assert c["decode_only_ms"] == pytest.approx(205.0)
    assert c["mixed_ms"] == pytest.approx(550.0)
    assert c["prompts_per_mixed_step"] == [1, 2]
    assert c["prompt_tokens_per_request"] == 40
    assert c["steps_to_first_token"] == [1, 2, 2]


def test_an_adapter_call_waits_for_the_running_step_then_stalls_the_engine():
    """The replica's load path measured on vLLM-CPU (cpu_engine --load-path): with a batch
    decoding, a load returned after about a step, the engine core taking it between steps."""
    async def scenario():
        loop = asyncio.get_running_loop()
        engine = SimEngine(_cpu_like(step_aligned_prefill=True,
                                     adapter_calls_between_steps=True), loop)
        a = _seq(loop, output_tokens=10)
        engine.submit(a)  # 0.6 s prefill step, then 0.2 s decode steps
        await asyncio.sleep(0.7)  # 0.1 s into the first decode step
        waited = engine.call_between_steps(0.05)
        await a.done
        return waited, a.done.result()

    waited, done = clock.run(scenario())
    assert waited == pytest.approx(0.1 + 0.05)
    assert done == pytest.approx(0.6 + 9 * 0.2 + 0.05), "the engine stalled 50 ms between steps"


def test_a_cpu_replica_loads_then_evicts_so_no_slot_shows_free_during_the_load():
    """LLMReplica._ensure_adapter's order: load, add, unload the victims; with the loads
    waiting for the engine's step (cpu_engine --load-path) a slot freed first would show
    free to the planner for the whole load."""
    from benchmarks.sim.replica import SimReplica

    profile = _cpu_like(step_aligned_prefill=True, adapter_calls_between_steps=True,
                        adapter_slots=2)

    async def scenario():
        loop = asyncio.get_running_loop()
        replica = SimReplica(0, profile, loop, "decay")
        for name in ("a", "b"):
            await replica.ensure_adapter(name, cause="request")
        busy = _seq(loop, output_tokens=20)
        replica.engine.submit(busy)
        await asyncio.sleep(0.7)  # decoding: the load waits for the running step
        load = asyncio.ensure_future(replica.ensure_adapter("c", cause="request"))
        seen = []
        while not load.done():
            seen.append((replica.slots.free, sorted(replica.slots.resident())))
            await asyncio.sleep(0.01)
        return seen, sorted(replica.slots.resident()), replica.counts

    seen, resident, counts = clock.run(scenario())
    assert all(free == 0 for free, _ in seen), seen
    assert len(seen) > 10, "the load and the unload each waited for a step end"
    assert resident == ["b", "c"] and counts["evictions"] == 1
