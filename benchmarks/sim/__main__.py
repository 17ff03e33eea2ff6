"""Replay a trace against the simulated cluster, or write a synthetic one.

    python -m benchmarks.sim --trace my.jsonl --replicas 64 --policies placement_aware,ray_multiplex
    python -m benchmarks.sim --write-trace my.jsonl --sessions 2000 --adapters 1000 --zipf 1.0
    python -m benchmarks.sim.report          # the full report (benchmarks/results/sim/)

The trace format is documented in benchmarks/sim/trace.py. Engine numbers come from
benchmarks/sim/calibration.py (--profile; --engine '{"adapter_slots": 64}' overrides
fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from benchmarks.sim.calibration import PROFILES
from benchmarks.sim.cores import SharedCores
from benchmarks.sim.policies import POLICIES
from benchmarks.sim.report import GPU_PLACEMENT, GPU_ROUTER
from benchmarks.sim.simulation import SimConfig, Simulation
from benchmarks.sim.trace import WorkloadSpec, generate, read, write
from ruvllm.config import PlacementConfig, RouterConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, help="JSONL trace to replay")
    parser.add_argument("--write-trace", type=Path, help="write a synthetic trace and exit")
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=300.0,
                        help="synthetic trace: session starts spread over this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--ingresses", type=int, default=1)
    parser.add_argument("--profile", default="h200-llama3-8b", choices=sorted(PROFILES))
    parser.add_argument("--engine", default="{}", help="JSON overrides of profile fields")
    parser.add_argument("--router", default=None,
                        help="RouterConfig fields as JSON (default: the report's GPU sizing "
                             "for GPU profiles, the shipped values for the CPU one)")
    parser.add_argument("--placement", default=None, help="PlacementConfig fields as JSON")
    parser.add_argument("--warmup", type=float, default=0.0,
                        help="seconds at the start not counted in the results")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    spec = WorkloadSpec(sessions=args.sessions, adapters=args.adapters, zipf_s=args.zipf,
                        duration_s=args.duration, seed=args.seed)
    if args.write_trace:
        write(args.write_trace, generate(spec))
        print(f"wrote {args.write_trace}")
        return 0
    try:
        trace = read(args.trace) if args.trace else generate(spec)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = json.loads(args.engine)
    if isinstance(overrides.get("shared_cores"), dict):  # JSON has no dataclasses
        base = PROFILES[args.profile].shared_cores
        overrides["shared_cores"] = (dataclasses.replace(base, **overrides["shared_cores"])
                                     if base else SharedCores(**overrides["shared_cores"]))
    profile = dataclasses.replace(PROFILES[args.profile], **overrides)
    gpu = profile.kv_tokens > 100_000
    router = (RouterConfig(**json.loads(args.router)) if args.router
              else GPU_ROUTER if gpu else RouterConfig())
    placement = (PlacementConfig(**json.loads(args.placement)) if args.placement
                 else GPU_PLACEMENT if gpu else PlacementConfig())
    results = {}
    for name in args.policies.split(","):
        if name not in POLICIES:
            print(f"error: unknown policy {name!r} (known: {', '.join(POLICIES)})",
                  file=sys.stderr)
            return 2
        cfg = SimConfig(policy=name, replicas=args.replicas, ingresses=args.ingresses,
                        profile=profile, seed=args.seed, router=router, placement=placement,
                        warmup_s=args.warmup, planner_replan_s=placement.report_period_s)
        started = time.perf_counter()
        results[name] = Simulation(cfg, trace).execute()
        r = results[name]
        print(f"{name:16s} {len(trace)} requests in {time.perf_counter() - started:5.1f} s: "
              f"adapter hits {r['adapter_hit_rate']:.1%}, cold loads/1k "
              f"{r['cold_loads_per_1k']:.1f}, prefix hits {r['prefix_hit_rate']:.1%}, "
              f"TTFT p50/p99 {r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f} ms, "
              f"rejected {r['rejection_rate']:.1%}, decision p99 {r['decision_cpu_p99_us']:.0f} us CPU")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
