"""Router benchmarks: placement, affinity, admission, and decision latency.

    python -m benchmarks.router_bench                      # all sections, ~40 min on 2 cores
    python -m benchmarks.router_bench --sections decision  # one section

Sections (each starts the stack from cluster.yaml with the overrides it names, compiled
engines, two replicas):

  adapters   20 LoRA adapters with Zipf popularity, 4 resident slots per replica:
             placement-aware routing vs Ray Serve's default (power of two choices).
             Adapter loads (from the replicas' own counters) and TTFT p50/p99.
  prefix     multi-turn sessions, each with its own long document after a shared system
             prompt, sized so that all sessions together fit in the two replicas' KV
             caches but not in one: placement-aware (session/prefix affinity) vs round
             robin. vLLM's prefix-cache hit rate (its scheduler's own counters) and TTFT.
  sessions   50, 100 and 200 concurrent 3-turn sessions against the shipped admission
             settings: goodput, TTFT p99, rejection rate, 5xx count.
  decision   PlacementAwareRouter.choose_replicas timed in-process: p50/p99 per decision.

Writes report.json, report.md and report.png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from benchmarks import loadgen
from benchmarks.harness import (
    MODEL, ROOT, log, start_stack, start_stack_engines_baseline, stop_stack, wait_until_ready,
)

ADMIN = "bench-admin-token-0123"
PORT = 8400


def describe(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/adapters", headers={"authorization": f"Bearer {ADMIN}"},
                     timeout=30).json()


def replica_totals(url: str) -> dict[str, float]:
    replicas = describe(url)["replicas"]
    keys = ("loads", "plan_loads", "evictions", "hits", "prefix_cache_queries",
            "prefix_cache_hits")
    return {k: sum(r.get(k, 0) for r in replicas) for k in keys} | {"replicas": len(replicas)}


def with_stack(name: str, out: Path, overrides: Callable[[dict], None],
               body: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    def configure(args: dict) -> None:
        args.setdefault("adapters", {})["admin_token"] = ADMIN
        overrides(args)

    log(f"{name}: starting the stack")
    started = time.monotonic()
    others = start_stack_engines_baseline()
    proc, url = start_stack(PORT, out / "logs" / f"{name}.log", configure)
    try:
        ready = wait_until_ready(f"{url}/v1/models", proc, 900, name)
        # The ingress answers before the engines have compiled; until every replica has
        # reported its capacity, admission holds requests (and 429s them after 30 s).
        while replica_totals(url)["replicas"] < 2:
            if time.monotonic() - started > 900:
                raise TimeoutError(f"{name}: engine replicas never reported")
            time.sleep(2)
        ready = time.monotonic() - started
        time.sleep(3)  # and the ingress has synced that capacity
        log(f"{name}: ready in {ready:.0f} s")
        result = body(url)
        result["startup_s"] = ready
        return result
    finally:
        stop_stack(proc, keep=others)


# -- adapters ---------------------------------------------------------------------------

def zipf_choices(n_items: int, n: int, s: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(n_items)]
    return rng.choices(range(n_items), weights=weights, k=n)


def workload(args: argparse.Namespace, names: list[str], picks: list[int]) -> dict[str, Any]:
    from benchmarks.harness import engine_settings

    return {"adapters": len(names), "requests": len(picks), "zipf_s": args.zipf,
            "concurrency": args.concurrency, "slots_per_replica": 8, "max_tokens": 16,
            "max_loras": args.max_loras or engine_settings()["max_loras"]}


def section_adapters(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from ruvllm.adapters.synthetic import make_lora_adapters
    from ruvllm.model_store import prepare_builtin

    names = [f"lora{i:02d}" for i in range(args.adapters)]
    root = Path.home() / ".cache" / "ruvllm" / "bench-adapters"
    log(f"adapters: preparing {len(names)} LoRA adapters in {root}")
    make_lora_adapters(prepare_builtin(MODEL), root, names, rank=8)
    picks = zipf_choices(len(names), args.adapter_requests, args.zipf, seed=1)

    def run(url: str) -> dict[str, Any]:
        before = replica_totals(url)

        async def drive() -> loadgen.Run:
            run = loadgen.Run()
            async with loadgen.client(args.concurrency) as client:
                jobs = [
                    (lambda i=i, a=a: loadgen.stream_chat(client, f"{url}/v1/chat/completions", {
                        "model": names[a], "max_tokens": 16, "ignore_eos": True,
                        "messages": [{"role": "user", "content": f"Request {i}: describe a cat."}]}))
                    for i, a in enumerate(picks)]
                for result, _ in await loadgen.bounded(args.concurrency, jobs):
                    run.results.append(result)
            run.ended = time.monotonic()
            return run

        run = asyncio.run(drive())
        after = replica_totals(url)
        summary = run.summary()
        summary["adapter_loads"] = after["loads"] - before["loads"]
        summary["adapter_evictions"] = after["evictions"] - before["evictions"]
        summary["adapter_plan_loads"] = after["plan_loads"] - before["plan_loads"]
        summary["adapter_hits"] = after["hits"] - before["hits"]
        return summary

    results = {}
    for policy in args.adapter_policies.split(","):
        def overrides(a: dict, policy=policy) -> None:
            a["router"]["policy"] = policy
            a["engine"].update(max_lora_rank=8)  # slots as shipped: max_cpu_loras 8
            if args.max_loras is not None:  # adapters in one batch; shipped 4 (cluster.yaml)
                a["engine"]["max_loras"] = args.max_loras
            a["adapters"].update(allowed_roots=[str(root)], declared={n: n for n in names})
        results[policy] = with_stack(f"adapters-{policy}", out, overrides, run)
        log(f"adapters {policy}: {results[policy]['adapter_loads']} loads "
            f"({results[policy]['adapter_plan_loads']} by the plan), "
            f"TTFT p99 {results[policy]['ttft_p99_ms']:.0f} ms")
    if len(results) < 2:  # a diagnostic run of one policy
        results["workload"] = workload(args, names, picks)
        return results
    base, ours = results["power_of_two"], results["placement_aware"]
    results["load_reduction"] = base["adapter_loads"] / max(1, ours["adapter_loads"])
    results["workload"] = workload(args, names, picks)
    return results


# -- prefix -----------------------------------------------------------------------------

def documents(n: int, words: int, seed: int) -> list[str]:
    """Distinct long documents from the standard library's own source text."""
    import inspect
    import json as json_module
    import textwrap

    corpus = " ".join(inspect.getsource(m) for m in (textwrap, json_module.decoder, argparse))
    tokens = corpus.split()
    rng = random.Random(seed)
    return [" ".join(tokens[(start := rng.randrange(len(tokens) - words)):start + words])
            for _ in range(n)]


SYSTEM = "You are a careful assistant. Answer questions about the document in one sentence."


def section_prefix(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    docs = documents(args.prefix_sessions, args.doc_words, seed=2)

    def run(url: str) -> dict[str, Any]:
        before = replica_totals(url)

        gate = asyncio.Semaphore(args.prefix_concurrency)

        async def one_session(client, i: int, run: loadgen.Run) -> None:
            # A user's think time before each turn. Without it the sessions' turns arrive
            # in the same order every round, and with an even number of sessions strict
            # round robin sends each session back to the replica it used before: a
            # lockstep artifact that makes round robin act like session affinity.
            think = random.Random(1000 + i)
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"Document:\n{docs[i]}\n\nWhat is it about?"}]
            for turn in range(args.turns):
                await asyncio.sleep(think.uniform(0, args.think_s))
                async with gate:  # sessions take turns; only so many requests in flight
                    result, text = await loadgen.stream_chat(
                        client, f"{url}/v1/chat/completions",
                        {"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0},
                        headers={"x-session-id": f"session-{i}"})
                run.results.append(result)
                messages += [{"role": "assistant", "content": text or "(no answer)"},
                             {"role": "user", "content": f"Follow-up question {turn + 1}?"}]

        async def drive() -> loadgen.Run:
            run = loadgen.Run()
            async with loadgen.client(args.prefix_sessions) as client:
                await asyncio.gather(*(one_session(client, i, run)
                                       for i in range(args.prefix_sessions)))
            run.ended = time.monotonic()
            return run

        run = asyncio.run(drive())
        after = replica_totals(url)
        summary = run.summary()
        queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
        hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
        summary.update(prefix_cache_queries=queries, prefix_cache_hits=hits,
                       prefix_hit_rate=hits / queries if queries else 0.0)
        return summary

    results = {}
    for policy in ("round_robin", "placement_aware"):
        def overrides(a: dict, policy=policy) -> None:
            a["router"]["policy"] = policy
            a["engine"]["num_gpu_blocks_override"] = args.prefix_kv_blocks
        results[policy] = with_stack(f"prefix-{policy}", out, overrides, run)
        log(f"prefix {policy}: hit rate {results[policy]['prefix_hit_rate']:.2%}, "
            f"TTFT p50 {results[policy]['ttft_p50_ms']:.0f} ms")
    rr, ours = results["round_robin"], results["placement_aware"]
    results["hit_rate_ratio"] = ours["prefix_hit_rate"] / max(1e-9, rr["prefix_hit_rate"])
    results["workload"] = {"sessions": args.prefix_sessions, "turns": args.turns,
                           "document_words": args.doc_words, "max_tokens": 24,
                           "in_flight": args.prefix_concurrency, "think_s": args.think_s,
                           "kv_blocks_per_replica": args.prefix_kv_blocks}
    return results


# -- sessions ---------------------------------------------------------------------------

def section_sessions(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    counts = [int(x) for x in args.session_counts.split(",")]

    def run(url: str) -> dict[str, Any]:
        per_count = {}
        for n in counts:
            async def one_session(client, i: int, run: loadgen.Run) -> None:
                messages = [{"role": "system", "content": "Be brief."}]
                for turn in range(3):
                    messages.append({"role": "user", "content": f"Session {i} turn {turn}: "
                                                                "tell me a fact about rivers."})
                    result, text = await loadgen.stream_chat(
                        client, f"{url}/v1/chat/completions",
                        {"model": MODEL, "messages": messages, "max_tokens": 32},
                        headers={"x-session-id": f"n{n}-s{i}", "x-tenant-id": f"t{i % 8}"})
                    run.results.append(result)
                    if result.status != 200:
                        await asyncio.sleep(float(result.retry_after or 1)
                                            if (result.retry_after or "").isdigit() else 1)
                        continue
                    messages.append({"role": "assistant", "content": text})

            async def drive() -> loadgen.Run:
                run = loadgen.Run()
                async with loadgen.client(n) as client:
                    await asyncio.gather(*(one_session(client, i, run) for i in range(n)))
                run.ended = time.monotonic()
                return run

            per_count[str(n)] = asyncio.run(drive()).summary()
            s = per_count[str(n)]
            log(f"sessions {n}: goodput {s['goodput_req_per_s']:.2f} req/s, TTFT p99 "
                f"{s['ttft_p99_ms']:.0f} ms, rejected {s['rejection_rate']:.1%}, "
                f"5xx {s['errors_5xx']}")
        return per_count

    return with_stack("sessions", out, lambda a: None, run)


# -- decision latency -------------------------------------------------------------------

def section_decision(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID
    from ray.serve.request_router import PendingRequest
    from ray.serve._private.common import RequestMetadata

    from ruvllm.router.hints import RoutingHints
    from ruvllm.router.placement_router import PlacementAwareRouter

    class FakeReplica:
        def __init__(self, rid: ReplicaID, stats: dict) -> None:
            self.replica_id, self.routing_stats = rid, stats

    results = {}
    for n_replicas in (2, 8, 32, 256):
        deployment = DeploymentID(name="LLMReplica", app_name="bench")
        router = PlacementAwareRouter(deployment_id=deployment,
                                      handle_source=DeploymentHandleSource.UNKNOWN)
        rng = random.Random(3)
        replicas = [FakeReplica(ReplicaID(unique_id=f"r{i}", deployment_id=deployment), {
            "kv_usage": rng.random(), "kv_capacity_tokens": 23000, "waiting": rng.randrange(4),
            "adapters": [f"lora{rng.randrange(20):02d}" for _ in range(4)],
            "adapter_slots_free": rng.randrange(2)}) for i in range(n_replicas)]

        async def decide(count: int) -> list[float]:
            times = []
            for i in range(count):
                hints = RoutingHints(
                    prompt_tokens=rng.randrange(20, 2000), max_tokens=256,
                    adapter=f"lora{rng.randrange(20):02d}" if rng.random() < 0.7 else None,
                    session_id=f"s{rng.randrange(5000)}",
                    prefix_keys=tuple((32 * 2 ** d, rng.randrange(10000)) for d in range(4)))
                pending = PendingRequest(args=[], kwargs={"hints": hints}, metadata=RequestMetadata(
                    request_id=str(i), internal_request_id=str(i)))
                started = time.perf_counter()
                ranks = await router.choose_replicas(replicas, pending)
                times.append(time.perf_counter() - started)
                pending.future.set_result(ranks[0][0])
                if i % 2:
                    router.on_request_completed(ranks[0][0].replica_id, str(i - 1))
            return times

        asyncio.run(decide(2000))  # warm the affinity tables
        times = sorted(asyncio.run(decide(args.decisions)))
        pick = lambda p: times[min(len(times) - 1, int(p / 100 * len(times)))] * 1e6
        results[str(n_replicas)] = {"p50_us": pick(50), "p99_us": pick(99),
                                    "max_us": times[-1] * 1e6,
                                    "mean_us": statistics.mean(times) * 1e6}
        log(f"decision, {n_replicas} replicas: p50 {results[str(n_replicas)]['p50_us']:.0f} us, "
            f"p99 {results[str(n_replicas)]['p99_us']:.0f} us")
    return results


# -- report -----------------------------------------------------------------------------

def _num(value: Any) -> str:
    return "not recorded" if value is None else f"{value:.0f}"


def write_report(out: Path, results: dict[str, Any], meta: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps({"meta": meta, **results}, indent=2))
    lines = ["# Router benchmarks", "",
             f"Measured {meta['date']} on {meta['machine']}; model {MODEL} (float32, compiled "
             "engines), two replicas, vLLM-CPU. Load client: benchmarks/loadgen.py (streamed "
             "chat requests).", ""]
    if "adapters" in results and "load_reduction" in results["adapters"]:
        a = results["adapters"]
        w = a["workload"]
        lines += ["## Adapter-heavy workload", "",
                  f"{w['requests']} requests over {w['adapters']} adapters (Zipf s={w['zipf_s']}), "
                  f"{w['concurrency']} concurrent, {w['slots_per_replica']} resident slots per "
                  f"replica, {w['max_tokens']} output tokens.", "",
                  "| routing | adapter loads | of them by the plan | evictions | TTFT p50 (ms) "
                  "| TTFT p99 (ms) | 5xx |",
                  "|---|---|---|---|---|---|---|"]
        for policy in ("power_of_two", "placement_aware"):
            r = a[policy]
            lines.append(f"| {policy} | {_num(r['adapter_loads'])} | "
                         f"{_num(r.get('adapter_plan_loads'))} | "
                         f"{_num(r.get('adapter_evictions'))} | {_num(r.get('ttft_p50_ms'))} | "
                         f"{_num(r['ttft_p99_ms'])} | {_num(r.get('errors_5xx'))} |")
        lines += ["", f"Cold loads: **{a['load_reduction']:.1f}x fewer** with placement-aware "
                  "routing (target >= 3x).", ""]
        if a.get("note"):
            lines += [a["note"], ""]
    if "prefix" in results:
        p = results["prefix"]
        w = p["workload"]
        lines += ["## Shared-prefix multi-turn sessions", "",
                  f"{w['sessions']} sessions x {w['turns']} turns, at most {w['in_flight']} "
                  "requests in flight; each session opens with a shared system prompt and its "
                  f"own ~{w['document_words']}-word document, so all sessions' contexts fit the "
                  "two replicas' KV caches together but not one"
                  + (f" ({w['kv_blocks_per_replica']} blocks of 32 tokens per replica); each "
                     f"turn follows a random 0-{w['think_s']:g} s think time"
                     if "kv_blocks_per_replica" in w else "") + ".", "",
                  "| routing | prefix-cache hit rate | TTFT p50 (ms) | TTFT p99 (ms) |",
                  "|---|---|---|---|"]
        for policy in ("round_robin", "placement_aware"):
            r = p[policy]
            lines.append(f"| {policy} | {r['prefix_hit_rate']:.1%} | {r['ttft_p50_ms']:.0f} | "
                         f"{r['ttft_p99_ms']:.0f} |")
        lines += ["", f"Hit rate: **{p['hit_rate_ratio']:.2f}x** round robin's (target >= 2x).", ""]
        if p.get("note"):
            lines += [p["note"], ""]
    if "sessions" in results:
        lines += ["## Concurrent sessions (shipped admission settings)", "",
                  "| sessions | requests | goodput (req/s) | goodput (tok/s) | TTFT p99 (ms) "
                  "| rejected (429) | 5xx |", "|---|---|---|---|---|---|---|"]
        for n, s in results["sessions"].items():
            if not n.isdigit():
                continue
            lines.append(f"| {n} | {s['requests']} | {s['goodput_req_per_s']:.2f} | "
                         f"{s['goodput_tok_per_s']:.1f} | {s['ttft_p99_ms']:.0f} | "
                         f"{s['rejection_rate']:.1%} | {s['errors_5xx']} |")
        lines.append("")
        if results["sessions"].get("note"):
            lines += [results["sessions"]["note"], ""]
    if "decision" in results:
        lines += ["## Routing decision latency", "",
                  "| replicas | p50 (us) | p99 (us) | max (us) |", "|---|---|---|---|"]
        for n, d in results["decision"].items():
            lines.append(f"| {n} | {d['p50_us']:.0f} | {d['p99_us']:.0f} | {d['max_us']:.0f} |")
        lines += ["", "Target: p99 < 1 ms (1000 us).", ""]
    lines += ["![router benchmarks](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot(out, results)


def plot(out: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("adapters", "prefix", "sessions", "decision") if k in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        r = results[key]
        if key == "adapters":
            names = [n for n in ("power_of_two", "placement_aware") if n in r]
            ax.bar(names, [r[n]["adapter_loads"] for n in names],
                   color=["grey", "tab:blue"][-len(names):])
            ax.set_title("adapter loads (lower is better)")
        elif key == "prefix":
            names = ["round_robin", "placement_aware"]
            ax.bar(names, [100 * r[n]["prefix_hit_rate"] for n in names], color=["grey", "tab:blue"])
            ax.set_title("prefix-cache hit rate % (higher is better)")
        elif key == "sessions":
            ns = [n for n in r if n.isdigit()]
            ax.plot(ns, [r[n]["ttft_p99_ms"] for n in ns], "o-", label="TTFT p99 (ms)")
            ax2 = ax.twinx()
            ax2.plot(ns, [100 * r[n]["rejection_rate"] for n in ns], "s--", color="tab:red",
                     label="rejected %")
            ax.set_title("sessions: TTFT p99 and 429 rate")
            ax.set_xlabel("concurrent sessions")
        else:
            ns = list(r)
            ax.bar([f"{n} replicas" for n in ns], [r[n]["p99_us"] for n in ns], color="tab:green")
            ax.axhline(1000, color="red", linestyle="--", label="1 ms target")
            ax.set_title("routing decision p99 (us)")
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="decision,adapters,prefix,sessions")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "router")
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--adapter-requests", type=int, default=480)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--adapter-policies", default="power_of_two,placement_aware",
                        help="one policy only for a diagnostic run (use a separate --out)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=None,
                        help="adapters section: distinct adapters in one engine batch "
                             "(default: cluster.yaml's, 4); at most the 8 resident slots")
    parser.add_argument("--prefix-sessions", type=int, default=32)
    parser.add_argument("--prefix-concurrency", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    # 400 words = ~880 tokens, so each session's context grows to ~1k tokens and the 32
    # sessions' contexts (~32k tokens) fit the two replicas' caches together (2 x 512
    # blocks x 32 tokens) but not one: the regime where the choice of replica decides
    # whether the cache hits. With 1 GiB (~23k tokens) per replica the spread of sessions
    # over both replicas costs round robin less (report notes).
    parser.add_argument("--doc-words", type=int, default=400)
    parser.add_argument("--prefix-kv-blocks", type=int, default=512,
                        help="KV blocks per replica in the prefix section")
    parser.add_argument("--think-s", type=float, default=2.0,
                        help="prefix section: think time before each turn, uniform 0..N s")
    parser.add_argument("--session-counts", default="50,100,200")
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--rewrite-report", action="store_true",
                        help="only re-render report.md/png from --out/report.json")
    args = parser.parse_args()
    if args.rewrite_report:
        saved = json.loads((args.out / "report.json").read_text())
        meta = saved.pop("meta")
        write_report(args.out, saved, meta)
        return 0
    (args.out / "logs").mkdir(parents=True, exist_ok=True)

    sections = {"adapters": section_adapters, "prefix": section_prefix,
                "sessions": section_sessions, "decision": section_decision}
    existing = args.out / "report.json"
    results: dict[str, Any] = {}
    if existing.is_file():  # re-running one section keeps the others' numbers
        results = {k: v for k, v in json.loads(existing.read_text()).items() if k != "meta"}
    for name in args.sections.split(","):
        results[name] = sections[name](args, args.out)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": "2 CPU cores, no GPU (vLLM CPU build)"}
    write_report(args.out, results, meta)
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
