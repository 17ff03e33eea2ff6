"""Step time and adapter-load time of ONE vLLM-CPU engine, set up as the router
benchmark's replicas are (the simulator's CPU profile is calibrated from this).

    python -m benchmarks.sim.cpu_engine_probe --max-loras 4   # ~5 min per value, under the lock

The engine is vLLM's own `AsyncLLM`, built from cluster.yaml's engine section by the
project's `build_vllm_args` with router_bench's override (`max_lora_rank` 8), bound to one
core (`VLLM_CPU_OMP_THREADS_BIND=0`, as `cpu_threads_bind: spread` gives each of the two
replicas), 1 GiB of KV cache, router_bench's synthetic rank-8 adapters and its prompt
("Request i: describe a cat." through the chat template). No Serve, no HTTP: what it
measures is the engine alone; router_bench measures the engine inside the stack, and the
difference is the serving path's share of the two cores.

Measured, for max_loras 4 (shipped) and 8:
  sweep      b = 1, 2, 4, 8, 16 sequences started together, 32 output tokens each, every
             sequence on an adapter (b over min(b, 4) adapters, so max_loras never binds),
             and b = 1, 8, 16 on the base model: the decode step time is the interval
             between a sequence's tokens (all b decode in lockstep).
  distinct   8 sequences over 1, 4 and 8 distinct adapters: what distinct adapters cost a
             step, and what max_loras costs when it binds (vLLM skips a request whose
             adapter would be one too many).
  closed     8 closed-loop clients over router_bench's own Zipf picks (seed 1), its first
             240 (one replica's half), 16 output tokens: requests/s of the engine alone.
  load       `add_lora` wall time of an adapter not yet in the engine's CPU cache (the
             call the replica's load goes through, vLLM's `load_lora_adapter`).
  arrivals   (`--arrivals`, instead of the above) what vLLM schedules in each step while
             new requests arrive at a running batch: vLLM's own iteration details
             (`enable_logging_iteration_details`: prompt requests and tokens, decoding
             requests, the step's model time) from a stat logger, and each request's
             submit and first-token times. b = 0, 1, 4, 8 sequences decoding, then 4 new
             requests one at a time (each after 4 of the batch's steps) and 4 at once;
             then the closed loop above with the step log. `step_composition` says how
             long a decode-only and a mixed step take and how many steps a new request
             waits for its first token.
  load_path  (`--load-path`, instead of the above) the replica's whole adapter-load path
             on the engine alone: the project's VLLMEngine (as deployments/replica.py
             runs it) loading lora00-19 in turn through vLLM's OpenAI model registry
             (`load_adapter`: file checks, then add_lora), evicting the oldest beyond 8
             slots (`unload_adapter`: registry, then remove_lora), as the replica's
             `_ensure_adapter` does; on an idle engine and with 8 sequences decoding
             (the engine takes the call between steps). Ray Serve's own hop is not in it.
Writes report.json and report.md under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import MODEL, ROOT, engine_settings, log
from benchmarks.router_bench import zipf_choices

OUT = ROOT / "benchmarks" / "results" / "sim" / "cpu_engine"
N_ADAPTERS = 20


def engine_env() -> None:
    # As deployments/replica.py's cpu_engine_env gives replica 0 of 2 on this machine.
    os.environ.update(VLLM_CPU_OMP_THREADS_BIND="0", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
                      VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")


async def start_engine(model_path: Path, max_loras: int, step_log: list | None = None) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from ruvllm.config import EngineConfig
    from ruvllm.deployments.vllm_engine import build_vllm_args

    settings = engine_settings() | {"max_lora_rank": 8, "max_loras": max_loras}
    args = build_vllm_args(model_path, MODEL, EngineConfig(**settings))
    if step_log is None:
        return AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(args))
    args.enable_logging_iteration_details = True
    return AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(args),
                                     stat_loggers=[step_logger(step_log)])


def step_logger(sink: list) -> Any:
    """A vLLM stat logger appending one row per engine step: (time the frontend got the
    step's outputs, prompt requests, prompt tokens, decoding requests, model time s).
    The replica's own recorder (deployments/vllm_engine.py) with a sink that keeps them."""
    import functools

    from ruvllm.deployments.vllm_engine import _StatsRecorder

    def keep(scheduler_stats: Any) -> None:
        d = getattr(scheduler_stats, "iteration_details", None)
        if d is not None and not d.is_dummy:
            sink.append((time.monotonic(), d.num_ctx_requests, d.num_ctx_tokens,
                         d.num_generation_requests, d.elapsed_ms / 1000))

    return functools.partial(_StatsRecorder, sink=keep)


class Probe:
    def __init__(self, engine: Any, prompts: list[str], adapter_root: Path) -> None:
        self.engine, self.prompts, self.root = engine, prompts, adapter_root
        self._n = 0

    def lora(self, index: int | None) -> Any:
        from vllm.lora.request import LoRARequest

        if index is None:
            return None
        name = f"lora{index:02d}"
        return LoRARequest(name, index + 1, str(self.root / name))

    async def one(self, adapter: int | None, max_tokens: int) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._n += 1
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0,
                                output_kind=RequestOutputKind.DELTA)
        started, stamps = time.monotonic(), []
        async for out in self.engine.generate(self.prompts[self._n % len(self.prompts)],
                                              params, f"probe-{self._n}",
                                              lora_request=self.lora(adapter)):
            now = time.monotonic()
            stamps += [now] * len(out.outputs[0].token_ids)
        return {"ttft_s": stamps[0] - started, "latency_s": stamps[-1] - started,
                "interval_s": (stamps[-1] - stamps[0]) / (len(stamps) - 1),
                "submitted": started, "first_token": stamps[0]}

    async def batch(self, adapters: list[int | None], max_tokens: int = 32) -> dict[str, Any]:
        started = time.monotonic()
        runs = await asyncio.gather(*(self.one(a, max_tokens) for a in adapters))
        return {"wall_s": time.monotonic() - started,
                "step_s": statistics.median(r["interval_s"] for r in runs),
                "ttft_max_s": max(r["ttft_s"] for r in runs)}

    async def closed_loop(self, picks: list[int], clients: int) -> dict[str, Any]:
        queue = list(picks)
        started = time.monotonic()

        async def client() -> list[dict[str, Any]]:
            done = []
            while queue:
                done.append(await self.one(queue.pop(0), 16))
            return done

        runs = [r for rs in await asyncio.gather(*(client() for _ in range(clients))) for r in rs]
        wall = time.monotonic() - started
        return {"requests": len(runs), "wall_s": wall, "req_per_s": len(runs) / wall,
                "decode_interval_p50_ms": 1000 * statistics.median(r["interval_s"] for r in runs),
                "ttft_p50_ms": 1000 * statistics.median(r["ttft_s"] for r in runs),
                "runs": runs}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in runs[0] if k not in ("submitted", "first_token")]
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"repeats": len(runs)}


async def arrivals(probe: Probe, steps: list, picks: list[int]) -> dict[str, Any]:
    """New requests arriving at a running batch, with vLLM's step log (see the docstring)."""
    out: dict[str, Any] = {}
    await probe.batch([None, 0, 1, 2, 3])  # warm-up: first steps compile and allocate
    for b in (0, 1, 4, 8):
        steps.clear()
        background = [asyncio.ensure_future(probe.one(i % 4, 60)) for i in range(b)]
        while b and len(steps) < 3:  # the batch is decoding (prefilled, tokens coming)
            await asyncio.sleep(0.05)
        new = []
        for i in range(4):
            new.append(asyncio.ensure_future(probe.one(i % 4, 16)))
            seen = len(steps)
            while len(steps) < seen + 4:
                await asyncio.sleep(0.02)
        burst = await asyncio.gather(*(probe.one(i % 4, 16) for i in range(4)))
        single = await asyncio.gather(*new)
        await asyncio.gather(*background)
        out[str(b)] = {"single": single, "burst": burst, "steps": list(steps),
                       "composition": step_composition(list(steps), single + burst)}
        c = out[str(b)]["composition"]
        log(f"  arrivals b={b}: decode-only {c['decode_only_ms']} ms, mixed {c['mixed_ms']} ms, "
            f"steps to first token {c['steps_to_first_token']}")
    steps.clear()
    loop = await probe.closed_loop(picks, 8)
    runs = loop.pop("runs")
    out["closed"] = loop | {"steps": list(steps),
                            "composition": step_composition(list(steps), runs)}
    log(f"  closed loop with step log: {loop['req_per_s']:.2f} req/s, "
        f"{out['closed']['composition']}")
    return out


def step_composition(steps: list[tuple], requests: list[dict[str, Any]]) -> dict[str, Any]:
    """What the step log says. steps: (frontend time, prompt requests, prompt tokens,
    decoding requests, model time s) per engine step, in order; requests: dicts with
    'submitted' and 'first_token' on the same clock. Returns the median model time of
    decode-only and of mixed (prompt + decode) steps, and per mixed step the prompt
    requests it carried; the median wall interval between step outputs of each kind
    (the whole step: scheduling, model, output handling); and per request the steps that
    output between its submission and its first token, both ends included: 1 = its first
    token came with the first step output after it arrived (an idle engine), 2 = the
    step running when it arrived, then its own."""
    def med(xs: list[float]) -> float | None:
        return round(1000 * statistics.median(xs), 1) if xs else None

    decode = [s[4] for s in steps if s[1] == 0 and s[3] > 0]
    mixed = [s for s in steps if s[1] > 0 and s[3] > 0]
    prefill_only = [s for s in steps if s[1] > 0 and s[3] == 0]
    gaps: dict[str, list[float]] = {"decode_only": [], "mixed": [], "prefill_only": []}
    for prev, s in zip(steps, steps[1:]):
        kind = "prefill_only" if s[3] == 0 else "mixed" if s[1] else "decode_only"
        gaps[kind].append(s[0] - prev[0])
    waits = sorted(steps_between(steps, r) for r in requests)
    return {"decode_only_ms": med(decode), "mixed_ms": med([s[4] for s in mixed]),
            "prefill_only_ms": med([s[4] for s in prefill_only]),
            "interval_ms": {k: med(v) for k, v in gaps.items()},
            "steps": len(steps), "mixed_steps": len(mixed),
            "prompts_per_mixed_step": sorted(s[1] for s in mixed),
            "prompt_tokens_per_request": (statistics.median(s[2] / s[1] for s in steps if s[1])
                                          if any(s[1] for s in steps) else None),
            "steps_to_first_token": waits}


async def measure(engine: Any, probe: Probe, repeats: int, picks: list[int],
                  sweep: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"load": [], "sweep_lora": {}, "sweep_base": {}}
    for i in range(9):  # the engine's CPU cache holds max_cpu_loras = 8 + 1 (replica.py)
        started = time.monotonic()
        await engine.add_lora(probe.lora(i))
        out["load"].append(time.monotonic() - started)
    log(f"  add_lora: {' '.join(f'{x * 1000:.0f}' for x in out['load'])} ms")
    await probe.batch([None, 0, 1, 2, 3])  # warm-up: first steps compile and allocate
    for b in (1, 2, 4, 8, 16) if sweep else ():
        runs = [await probe.batch([i % 4 for i in range(b)]) for _ in range(repeats)]
        out["sweep_lora"][str(b)] = median_of(runs)
        log(f"  lora b={b}: step {out['sweep_lora'][str(b)]['step_s'] * 1000:.1f} ms")
    for b in (1, 8, 16) if sweep else ():
        runs = [await probe.batch([None] * b) for _ in range(repeats)]
        out["sweep_base"][str(b)] = median_of(runs)
        log(f"  base b={b}: step {out['sweep_base'][str(b)]['step_s'] * 1000:.1f} ms")
    out["distinct_1"] = median_of([await probe.batch([0] * 8) for _ in range(repeats)])
    out["distinct_4"] = median_of([await probe.batch([i % 4 for i in range(8)])
                                   for _ in range(repeats)])
    out["distinct_8"] = median_of([await probe.batch(list(range(8))) for _ in range(repeats)])
    log(f"  8 seqs over 1 / 4 / 8 adapters: {out['distinct_1']['wall_s']:.2f} / "
        f"{out['distinct_4']['wall_s']:.2f} / {out['distinct_8']['wall_s']:.2f} s")
    out["closed"] = await probe.closed_loop(picks, 8)
    del out["closed"]["runs"]
    log(f"  closed loop: {out['closed']['req_per_s']:.2f} req/s")
    return out


async def run(args: argparse.Namespace, save: Any) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from ruvllm.adapters.synthetic import make_lora_adapters
    from ruvllm.model_store import prepare_builtin

    model_path = prepare_builtin(MODEL)
    root = Path.home() / ".cache" / "ruvllm" / "bench-adapters"  # router_bench's adapters
    make_lora_adapters(model_path, root, [f"lora{i:02d}" for i in range(N_ADAPTERS)], rank=8)
    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = [tok.apply_chat_template([{"role": "user",
                                         "content": f"Request {i}: describe a cat."}],
                                       tokenize=False, add_generation_prompt=True)
               for i in range(480)]
    prompt_tokens = len(tok(prompts[100])["input_ids"])
    # router_bench's picks, as one of its two replicas would see about half of them.
    picks = zipf_choices(N_ADAPTERS, 480, 1.1, seed=1)[:args.closed_requests]
    results: dict[str, Any] = {"prompt_tokens": prompt_tokens}
    # a run of one max_loras (or mode) keeps the others'
    kept = kept_of(args.out)
    results |= {k: v for k, v in kept.items() if k.isdigit() or k in ("arrivals", "load_path")}
    if args.load_path:
        for max_loras in args.max_loras:
            meta = run_meta()
            results.setdefault("load_path", {})[str(max_loras)] = {
                **await load_path(model_path, root, prompts, max_loras), "meta": meta}
            results["load_path"][str(max_loras)]["meta"] |= run_meta(end=True)
            save(results)
        return results
    for max_loras in args.max_loras:
        log(f"engine max_loras {max_loras}: starting")
        started = time.monotonic()
        steps: list = []
        engine = await start_engine(model_path, max_loras, steps if args.arrivals else None)
        try:
            log(f"  up in {time.monotonic() - started:.0f} s")
            probe = Probe(engine, prompts, root)
            if args.arrivals:
                for i in range(9):
                    await engine.add_lora(probe.lora(i))
                sched = engine.vllm_config.scheduler_config
                results.setdefault("arrivals", {})[str(max_loras)] = {
                    "meta": run_meta(),
                    "scheduler": {"enable_chunked_prefill": sched.enable_chunked_prefill,
                                  "max_num_batched_tokens": sched.max_num_batched_tokens,
                                  "long_prefill_token_threshold":
                                      sched.long_prefill_token_threshold},
                    **await arrivals(probe, steps, picks[:args.arrival_requests])}
                results["arrivals"][str(max_loras)]["meta"] |= run_meta(end=True)
            else:
                results[str(max_loras)] = await measure(engine, probe, args.repeats, picks,
                                                        not args.no_sweep)
        finally:
            engine.shutdown()
        save(results)  # each engine's numbers as soon as they are in
    return results


async def load_path(model_path: Path, root: Path, prompts: list[str],
                    max_loras: int) -> dict[str, Any]:
    from vllm import SamplingParams

    from ruvllm.config import EngineConfig
    from ruvllm.deployments.vllm_engine import VLLMEngine

    settings = engine_settings() | {"max_lora_rank": 8, "max_loras": max_loras}
    engine = VLLMEngine(model_path, MODEL, EngineConfig(**settings))
    started = time.monotonic()
    await engine.start()
    log(f"  VLLMEngine up in {time.monotonic() - started:.0f} s")
    out: dict[str, Any] = {"idle": [], "busy": [], "unload_idle": [], "unload_busy": []}
    resident: list[str] = []
    params = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0)
    try:
        for phase in ("idle", "busy"):
            batch = []
            if phase == "busy":
                async def decode(i: int) -> None:
                    async for _ in engine._engine.generate(prompts[i], params, f"bg-{i}"):
                        pass
                batch = [asyncio.ensure_future(decode(i)) for i in range(8)]
                await asyncio.sleep(5)  # prefilled, decoding
            for i in range(20):
                name = f"lora{i:02d}" if phase == "idle" else f"lora{(i + 10) % 20:02d}"
                if name in resident:
                    continue
                t0 = time.monotonic()
                await engine.load_adapter(name, str(root / name))
                out[phase].append(time.monotonic() - t0)
                resident.append(name)
                if len(resident) > 8:
                    t0 = time.monotonic()
                    await engine.unload_adapter(resident.pop(0))
                    out[f"unload_{phase}"].append(time.monotonic() - t0)
            for task in batch:
                task.cancel()
            await asyncio.gather(*batch, return_exceptions=True)
            log(f"  load path {phase}: median "
                f"{1000 * statistics.median(out[phase]):.0f} ms over {len(out[phase])}, unload "
                f"{1000 * statistics.median(out['unload_' + phase]):.0f} ms")
    finally:
        engine._engine.shutdown()
    return out


def kept_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}


def run_meta(end: bool = False) -> dict[str, str]:
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    return {"ended": now, "load_end": load} if end else {"started": now, "load_start": load}


def fit(sweep: dict[str, Any], key: str = "step_s") -> tuple[float, float]:
    """Least-squares line key = base + per_seq x b through the sweep's medians."""
    xs = [int(b) for b in sweep]
    slope, intercept = statistics.linear_regression(xs, [sweep[b][key] for b in sweep])
    return intercept, slope


def write(out: Path, results: dict[str, Any], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for key in results:
        if key.isdigit() and results[key]["sweep_lora"]:
            base, per_seq = fit(results[key]["sweep_lora"])
            results[key]["fit_lora"] = {"decode_base_s": base, "decode_per_seq_s": per_seq}
    (out / "report.json").write_text(json.dumps({"meta": meta, **results}, indent=2))
    lines = ["# One vLLM-CPU engine as router_bench's replicas run it", "",
             f"{meta['machine']}. `python -m benchmarks.sim.cpu_engine_probe --max-loras N`; "
             "the module docstring says what each row is. "
             f"Prompt: {results['prompt_tokens']} tokens (router_bench's, chat template). "
             "Medians of the repeats.", ""]
    for key in (k for k in results if k.isdigit()):
        r = results[key]
        m = r["meta"]
        lines += [f"## max_loras {key}", "",
                  f"Measured {m['started']} - {m['ended']} UTC (1/5/15-min load average at "
                  f"start {m['load_start']}, at end {m['load_end']}); "
                  f"{r['distinct_1']['repeats']} repeats.", ""]
        if r["sweep_lora"]:
            lines += ["| sequences | step (ms), on adapters | step (ms), base model |",
                      "|---|---|---|"]
        else:
            lines.append("No batch sweep here (`--no-sweep`): it puts at most 4 adapters in a "
                         "batch, so max_loras never binds in it.")
        for b, s in r["sweep_lora"].items():
            base = r["sweep_base"].get(b)
            lines.append(f"| {b} | {s['step_s'] * 1000:.1f} | "
                         f"{base['step_s'] * 1000:.1f} |" if base else
                         f"| {b} | {s['step_s'] * 1000:.1f} | - |")
        if "fit_lora" in r:
            f = r["fit_lora"]
            lines += ["", f"Fit (adapters): step = {f['decode_base_s'] * 1000:.1f} ms + "
                      f"{f['decode_per_seq_s'] * 1000:.2f} ms x sequences."]
        c = r["closed"]
        distinct = ", ".join(
            f"{n} adapter{'s' if n > 1 else ''} {r[f'distinct_{n}']['wall_s']:.2f} s "
            f"({r[f'distinct_{n}']['step_s'] * 1000:.0f})" for n in (1, 4, 8))
        lines += ["",
                  f"8 sequences x 32 tokens started together, wall time (step ms): over {distinct}.",
                  "",
                  f"`add_lora` of an adapter not in the CPU cache: median "
                  f"{statistics.median(r['load']) * 1000:.0f} ms (min-max "
                  f"{min(r['load']) * 1000:.0f}-{max(r['load']) * 1000:.0f} ms, "
                  f"{len(r['load'])} adapters).", "",
                  f"Closed loop, 8 clients, router_bench's first {c['requests']} Zipf picks, 16 "
                  f"tokens: {c['req_per_s']:.2f} req/s, decode interval p50 "
                  f"{c['decode_interval_p50_ms']:.0f} ms, TTFT p50 {c['ttft_p50_ms']:.0f} ms.", ""]
    lines += arrivals_lines(results.get("arrivals", {}))
    for key, lp in results.get("load_path", {}).items():
        m = lp["meta"]
        ms = lambda xs: (f"median {1000 * statistics.median(xs):.0f} ms (min-max "
                         f"{1000 * min(xs):.0f}-{1000 * max(xs):.0f}, {len(xs)})")
        lines += [f"## The replica's adapter-load path (`--load-path`), max_loras {key}", "",
                  f"Measured {m['started']} - {m['ended']} UTC (load average at start "
                  f"{m['load_start']}, at end {m['load_end']}). The project's VLLMEngine "
                  "(load_adapter / unload_adapter, as the replica's _ensure_adapter calls "
                  "them), engine alone, no Serve hop.", "",
                  f"- load, idle engine: {ms(lp['idle'])}; unload: {ms(lp['unload_idle'])}",
                  f"- load, 8 sequences decoding: {ms(lp['busy'])}; unload: "
                  f"{ms(lp['unload_busy'])}", ""]
    (out / "report.md").write_text("\n".join(lines))


def arrivals_lines(arr: dict[str, Any]) -> list[str]:
    if not arr:
        return []
    lines = ["## New requests arriving at a running batch (`--arrivals`)", "",
             "vLLM's iteration details per engine step (stat logger): 'model' is the step's "
             "model time as vLLM measures it, 'interval' the wall time between two steps' "
             "outputs reaching the frontend. Steps to first token: step outputs from a "
             "request's submission to its first token, both included (2 = the step running "
             "when it arrived, then its own).", ""]
    for key, a in arr.items():
        m, sch = a["meta"], a["scheduler"]
        lines += [f"### max_loras {key}", "",
                  f"Measured {m['started']} - {m['ended']} UTC (load average at start "
                  f"{m['load_start']}, at end {m['load_end']}). Scheduler: chunked prefill "
                  f"{sch['enable_chunked_prefill']}, max_num_batched_tokens "
                  f"{sch['max_num_batched_tokens']}.", "",
                  "| running batch | decode-only step: model / interval (ms) | mixed step: "
                  "model / interval (ms) | prompts per mixed step | steps to first token "
                  "(4 single, 4 at once) | TTFT single / at once, median (ms) |",
                  "|---|---|---|---|---|---|"]
        for b in ("0", "1", "4", "8"):
            if b not in a:
                continue
            c = a[b]["composition"]
            single, burst = a[b]["single"], a[b]["burst"]
            waits = [steps_between(a[b]["steps"], r) for r in single + burst]
            lines.append(
                f"| {b} | {c['decode_only_ms']} / {c['interval_ms']['decode_only']} | "
                f"{c['mixed_ms']} / {c['interval_ms']['mixed']} | "
                f"{', '.join(map(str, c['prompts_per_mixed_step'])) or '-'} | "
                f"{', '.join(map(str, waits[:4]))}; {', '.join(map(str, waits[4:]))} | "
                f"{1000 * statistics.median(r['ttft_s'] for r in single):.0f} / "
                f"{1000 * statistics.median(r['ttft_s'] for r in burst):.0f} |")
        c = a["closed"]
        k = c["composition"]
        waits = k["steps_to_first_token"]
        lines += ["", f"Closed loop with the step log (8 clients, router_bench's first "
                  f"{c['requests']} picks, 16 tokens): {c['req_per_s']:.2f} req/s, TTFT p50 "
                  f"{c['ttft_p50_ms']:.0f} ms, decode interval p50 "
                  f"{c['decode_interval_p50_ms']:.0f} ms; {k['steps']} steps, "
                  f"{k['mixed_steps']} mixed; decode-only step model / interval "
                  f"{k['decode_only_ms']} / {k['interval_ms']['decode_only']} ms, mixed "
                  f"{k['mixed_ms']} / {k['interval_ms']['mixed']} ms; steps to first token "
                  f"median {statistics.median(waits)} (min-max {waits[0]}-{waits[-1]}).", ""]
    return lines


def steps_between(steps: list, request: dict[str, Any]) -> int:
    return sum(1 for s in steps if request["submitted"] < s[0] <= request["first_token"] + 1e-3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-loras", type=lambda s: [int(x) for x in s.split(",")],
                        default=[4, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the batch sweep (it never lets max_loras bind)")
    parser.add_argument("--closed-requests", type=int, default=240)
    parser.add_argument("--arrivals", action="store_true",
                        help="only the arrivals mode (step log; see the docstring)")
    parser.add_argument("--load-path", action="store_true",
                        help="only the replica's adapter-load path (see the docstring)")
    parser.add_argument("--arrival-requests", type=int, default=60,
                        help="closed-loop requests in the arrivals mode")
    args = parser.parse_args()
    engine_env()
    meta = run_meta() | {"machine": f"{os.cpu_count()} CPU cores, engine bound to core 0"}

    def save(results: dict[str, Any]) -> None:
        ended = run_meta(end=True)
        for key in (k for k in results if k.isdigit()):
            results[key].setdefault("meta", meta | ended)
        write(args.out, results, meta | ended)

    asyncio.run(run(args, save))
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
