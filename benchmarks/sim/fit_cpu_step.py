"""The CPU profile from measurements: one engine alone (benchmarks/sim/cpu_engine_probe.py)
and the same engines inside the stack (router_bench, benchmarks/results/router/max_loras).

    python -m benchmarks.sim.fit_cpu_step      # seconds, pure simulation (no engines)

1. Engine alone: least-squares lines through the probe's batch sweep (sequences on
   adapters, started together): decode step = base + per_seq x sequences; the slowest
   first token of b sequences started together = one step + b x (one 40-token prefill),
   so prefill tok/s = 40 / the slope. `add_lora` median = the adapter-load stall.
2. Check of the engine model: the probe's closed loop (one engine, 8 clients, router_bench's
   first 120 Zipf picks) replayed in the simulator on that profile, for each max_loras the
   probe measured: simulated vs measured requests/s and decode interval.
3. The stack's share: inside router_bench two engines, Serve's processes and the load
   client share the 2 cores. `stretch` = router_bench's decode interval / the probe's
   closed-loop decode interval at the same max_loras and 8 clients per engine (1.31 at
   max_loras 4, 1.89 at 8). The profile does not multiply engine times by it any more:
   the cores are shared (benchmarks/sim/cores.py), and the one parameter of that model,
   the stack's CPU per running sequence per engine step, is the value at which the
   simulated router_bench (power_of_two, max_loras 4, as its stack ran) shows the same
   stretch over the simulated engine alone as the real one did (`shared_cores`). The
   max_loras 8 run is the check: its decode interval, simulated against measured.
   Goodputs and adapter-load counts are not used: they are the validation.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT
from benchmarks.sim.calibration import EngineProfile
from benchmarks.sim.cores import SharedCores
from benchmarks.sim.cpu_engine_probe import fit

PROBE = ROOT / "benchmarks" / "results" / "sim" / "cpu_engine" / "report.json"
STACK = ROOT / "benchmarks" / "results" / "router" / "max_loras"
PROMPT_TOKENS = 40  # the probe's prompt (router_bench's, through the chat template)


def engine_alone(probe: dict[str, Any]) -> dict[str, float]:
    sweep = probe["sweep_lora"]
    base, per_seq = fit(sweep)
    _, prefill_per_seq = fit(sweep, "ttft_max_s")
    return {"decode_base_s": base, "decode_per_seq_s": per_seq,
            "prefill_tokens_per_s": PROMPT_TOKENS / prefill_per_seq,
            "lora_load_s": statistics.median(probe["load"])}


def decode_interval_s(records: list[Any]) -> float:
    """loadgen's definition: per request (latency - TTFT) / (tokens - 1), the median."""
    return statistics.median((r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in records
                             if r.status == "ok" and r.output_tokens > 1)


def simulate_probe_loop(profile: EngineProfile, requests: int, clients: int = 8) -> dict[str, float]:
    """The probe's closed loop on one simulated engine: the replica holds the 8 most
    popular adapters when the loop starts (the probe added lora00-08 first)."""
    from benchmarks.sim.report import cpu_bench_trace
    from benchmarks.sim.simulation import SimConfig, Simulation

    trace = cpu_bench_trace(concurrency=clients)[:requests]
    sim = Simulation(SimConfig(policy="power_of_two", replicas=1, profile=profile, seed=0,
                               startup_s=12.0), trace)
    result = sim.execute()
    ok = [r for r in sim.records if r.status == "ok"]
    return {"req_per_s": result["completed_req_per_s"], "decode_interval_s": decode_interval_s(ok),
            "ttft_p50_s": statistics.median(r.ttft_s for r in ok)}


def simulate_stack(profile: EngineProfile, seed: int = 0) -> dict[str, float]:
    """router_bench's adapter section, power_of_two (the run the stretch was measured in),
    with the validation's start-up (benchmarks/sim/report.py)."""
    from benchmarks.sim.report import (CPU_BENCH_STAGGER_S, CPU_BENCH_STARTUP_S,
                                       cpu_bench_trace)
    from benchmarks.sim.simulation import SimConfig, Simulation

    sim = Simulation(SimConfig(policy="power_of_two", replicas=2, profile=profile, seed=seed,
                               startup_s=CPU_BENCH_STARTUP_S,
                               replica_stagger_s=CPU_BENCH_STAGGER_S), cpu_bench_trace())
    result = sim.execute()
    ok = [r for r in sim.records if r.status == "ok"]
    return {"req_per_s": result["completed_req_per_s"], "decode_interval_s": decode_interval_s(ok),
            "ttft_p50_s": statistics.median(r.ttft_s for r in ok)}


def with_overhead(profile: EngineProfile, per_seq_s: float) -> EngineProfile:
    """`profile` (engine-alone times) on router_bench's 2 cores, shared with the stack."""
    return dataclasses.replace(profile, shared_cores=SharedCores(
        cores=2, overhead_per_step_s=0.0, overhead_per_seq_s=per_seq_s))


def fit_overhead(alone: EngineProfile, stretch: float, hi: float = 0.2,
                 iterations: int = 30) -> float:
    """The stack CPU per running sequence per step at which the simulated router_bench's
    decode interval is `stretch` x the simulated engine alone's (the probe's closed loop,
    same max_loras): bisection, the stretch growing with the overhead."""
    target = stretch * simulate_probe_loop(alone, 120)["decode_interval_s"]
    lo = 0.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if simulate_stack(with_overhead(alone, mid))["decode_interval_s"] < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def calibrate(base_profile: EngineProfile, probe_path: Path = PROBE,
              stack_dir: Path = STACK) -> dict[str, Any]:
    probe = json.loads(probe_path.read_text())
    alone = engine_alone(probe["4"])
    profile = dataclasses.replace(base_profile, shared_cores=None, **alone)
    out: dict[str, Any] = {"engine_alone": alone, "check": {}, "stretch": {}}
    for key in (k for k in probe if k.isdigit()):
        loop = probe[key]["closed"]
        sim = simulate_probe_loop(dataclasses.replace(profile, max_loras=int(key)), loop["requests"])
        out["check"][key] = {"measured_req_per_s": loop["req_per_s"],
                             "measured_decode_interval_s": loop["decode_interval_p50_ms"] / 1000,
                             "measured_ttft_p50_s": loop["ttft_p50_ms"] / 1000,
                             "simulated": sim}
        stack = stack_dir / f"power_of_two-max_loras{key}" / "report.json"
        if stack.is_file():
            run = json.loads(stack.read_text())["adapters"]["power_of_two"]
            out["stretch"][key] = run["decode_interval_p50_ms"] / loop["decode_interval_p50_ms"]
            out["check"][key]["measured_stack"] = {
                "decode_interval_s": run["decode_interval_p50_ms"] / 1000,
                "ttft_p50_s": run["ttft_p50_ms"] / 1000}
    per_seq = fit_overhead(profile, out["stretch"]["4"])
    out["shared_cores"] = {"overhead_per_seq_s": per_seq}
    for key in out["check"]:
        shared = with_overhead(dataclasses.replace(profile, max_loras=int(key)), per_seq)
        out["check"][key]["simulated_stack"] = simulate_stack(shared)
    return out


def main() -> int:
    from benchmarks.sim.calibration import CPU_SMOLLM2

    print(json.dumps(calibrate(CPU_SMOLLM2), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
