"""vLLM-CPU against mistral.rs on the same model, workload and run.

    nice -n 10 flock /tmp/ruvllm-heavy.lock .venv/bin/python -m benchmarks.backends_bench

Engine targets, each started in its own process (so start-up time and resident memory
are its own) and driven through ruvllm's engine protocol (`Engine.chat`, streamed), with
the same chat prompts (~100 tokens) and 64 output tokens each (`ignore_eos`, greedy):

  vllm-f32        vLLM-CPU, float32, torch.compile on (what `make serve` runs)
  mistralrs-f32   mistral.rs, the float32 HF checkpoint
  mistralrs-q8_0  mistral.rs, ISQ Q8_0 at load
  mistralrs-q4k   mistral.rs, ISQ Q4K at load
  mistralrs-q4_0  mistral.rs, ISQ Q4_0 at load (the 4-bit type with an AVX2 kernel at this
                  model's width: see the report's notes)
  mistralrs-gguf  mistral.rs, the builtin Q4_1 GGUF as it is

at concurrency 1, 16 and 64: output tokens/s, TTFT p50/p99; plus resident memory of the
engine process tree after the runs and start-up time. Then mistral.rs through the whole
stack (`serve run`, HTTP, ingress, router, one replica) against bare mistral.rs (its
`Runner`, one thread per stream, no ruvllm code) at concurrency 16.

Held-out perplexity: the GGUF's weights are exactly the base checkpoint's (the HF
checkpoint is their float32 dequantization), so its perplexity is the base's; mistral.rs's
API gives no prompt log-probabilities, so the ISQ variants' perplexity comes from
`benchmarks.mistralrs_isq_quality` (their rounding reproduced in torch, checked against
mistral.rs's own log-probabilities, scored with the ISQ gate's code), read from
benchmarks/results/backends/isq_quality.json; null where that has no row for the type.

Writes report.json, report.md and report.png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "backends"
TARGETS = ("vllm-f32", "mistralrs-f32", "mistralrs-q8_0", "mistralrs-q4k", "mistralrs-q4_0",
           "mistralrs-gguf")
OUTPUT_TOKENS = 64
TOPICS = ("rivers", "bridges", "compilers", "volcanoes", "libraries", "trains", "tea", "maps")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": (
        f"Request {i}. Write a detailed, well organised explanation of {TOPICS[i % len(TOPICS)]} "
        "for a curious student: where they come from, how they work, why they matter, what "
        "can go wrong with them and how people fix it, with two short examples.")}]
        for i in range(n)]


def levels(concurrency: list[int]) -> list[tuple[int, int]]:
    # (concurrency, requests): a few waves each, within the run's time budget.
    return [(c, max(4, c) if c > 1 else 4) for c in concurrency]


def _rss_tree_mib(pid: int) -> float:
    """Resident memory of a process and its descendants (vLLM's engine core is a child)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,rss="], capture_output=True,
                         text=True).stdout.split("\n")
    rows = [tuple(int(x) for x in line.split()) for line in out if line.strip()]
    children: dict[int, list[int]] = {}
    rss = {}
    for p, pp, r in rows:
        children.setdefault(pp, []).append(p)
        rss[p] = r
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total / 1024


# -- one engine target, in its own process ---------------------------------------------------


def make_target_engine(target: str, max_seqs: int) -> Any:
    from ruvllm.deployments.mistralrs_engine import MistralRsEngine
    from ruvllm.deployments.mistralrs_model import MistralRsModel
    from ruvllm.config import EngineConfig
    from ruvllm.model_store import BUILTIN_MODELS, prepare_builtin

    base = prepare_builtin("smollm2-135m-instruct")
    if target == "vllm-f32":
        from ruvllm.deployments.vllm_engine import VLLMEngine

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        return VLLMEngine(base, "m", EngineConfig(block_size=32, max_num_seqs=max_seqs))
    config = EngineConfig(backend="mistralrs", max_num_seqs=max_seqs)
    threads = len(os.sched_getaffinity(0))
    if target == "mistralrs-gguf":
        gguf = BUILTIN_MODELS["smollm2-135m-instruct"].locate()
        return MistralRsEngine(MistralRsModel(base, gguf_file=gguf), "m", config, threads)
    in_situ = {"mistralrs-f32": None, "mistralrs-q8_0": "Q8_0", "mistralrs-q4k": "Q4K",
               "mistralrs-q4_0": "Q4_0"}[target]
    return MistralRsEngine(MistralRsModel(base, base, in_situ=in_situ), "m", config, threads)


async def one_stream(engine: Any, messages: list, i: int) -> tuple[float | None, int, float]:
    started = time.monotonic()
    ttft, tokens = None, 0
    body = {"model": "m", "messages": messages, "max_tokens": OUTPUT_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    from ruvllm.deployments import vllm_compat
    from ruvllm.deployments.client_error import parse_request

    # As the ingress hands it to an engine: parsed once into vLLM's request model.
    request = parse_request(vllm_compat.chat_request_cls(), body)
    async for item in engine.chat(request, f"b{i}-{time.monotonic_ns()}"):
        if isinstance(item, str) and item.startswith("data: {"):
            event = json.loads(item[6:])
            for choice in event.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    ttft = ttft if ttft is not None else time.monotonic() - started
                    tokens += 1
        elif not isinstance(item, str) and item.status != 200:
            raise RuntimeError(f"request failed: {item.body}")
    return ttft, tokens, time.monotonic() - started


async def drive(engine: Any, concurrency: int, requests: int) -> dict[str, float]:
    gate = asyncio.Semaphore(concurrency)
    batch = prompts(requests)

    async def job(i: int):
        async with gate:
            return await one_stream(engine, batch[i], i)

    started = time.monotonic()
    results = await asyncio.gather(*(job(i) for i in range(requests)))
    wall = time.monotonic() - started
    return summarize(results, wall, concurrency, requests)


def summarize(results: list, wall: float, concurrency: int, requests: int) -> dict[str, float]:
    ttfts = sorted(r[0] for r in results if r[0] is not None)

    def pct(p: float) -> float:
        return ttfts[min(len(ttfts) - 1, round(p / 100 * (len(ttfts) - 1)))] * 1000

    tokens = sum(r[1] for r in results)
    return {"concurrency": concurrency, "requests": requests, "output_tokens": tokens,
            "wall_s": wall, "output_tok_per_s": tokens / wall,
            "ttft_p50_ms": pct(50), "ttft_p99_ms": pct(99)}


def run_target(target: str, concurrency: list[int]) -> dict[str, Any]:
    engine = make_target_engine(target, max(concurrency))

    async def main() -> dict[str, Any]:
        started = time.monotonic()
        await engine.start()
        startup = time.monotonic() - started
        await drive(engine, 2, 2)  # warm-up (first-request allocations, compiled graphs)
        rows = []
        for c, n in levels(concurrency):
            rows.append(await drive(engine, c, n))
            log(f"  {target} c={c}: {rows[-1]['output_tok_per_s']:.1f} tok/s, "
                f"TTFT p50 {rows[-1]['ttft_p50_ms']:.0f} ms")
        return {"startup_s": startup, "levels": rows, "rss_mib": _rss_tree_mib(os.getpid())}

    result = asyncio.run(main())
    engine.shutdown()
    return result


# -- bare mistral.rs and mistral.rs through the stack -------------------------------------------


def run_bare_mistralrs(concurrency: int, requests: int) -> dict[str, Any]:
    """mistral.rs's own Runner, a thread per stream: no ruvllm code on the path."""
    from concurrent.futures import ThreadPoolExecutor

    from mistralrs import ChatCompletionRequest, Runner

    from ruvllm.deployments.mistralrs_model import MistralRsModel
    from ruvllm.model_store import prepare_builtin

    base = prepare_builtin("smollm2-135m-instruct")
    runner = Runner(which=MistralRsModel(base, base).which(), max_seqs=max(64, concurrency))
    # The Runner takes one call at a time ("Already borrowed" otherwise), as the engine's
    # _send knows; a chat send returns at once with its stream.
    send_lock = threading.Lock()

    def one(messages: list) -> tuple[float | None, int, float]:
        started = time.monotonic()
        ttft, tokens = None, 0
        with send_lock:
            stream = runner.send_chat_completion_request(ChatCompletionRequest(
                model="default", messages=messages, max_tokens=OUTPUT_TOKENS, temperature=0,
                ignore_eos=True, stream=True))
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.monotonic() - started
                tokens += 1
        return ttft, tokens, time.monotonic() - started

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, prompts(2)))  # warm-up
        started = time.monotonic()
        results = list(pool.map(one, prompts(requests)))
        return summarize(results, time.monotonic() - started, concurrency, requests)


def run_stack_mistralrs(concurrency: int, requests: int, port: int) -> dict[str, Any]:
    """`serve run` of cluster.yaml with one mistral.rs replica, over HTTP."""
    import httpx

    from benchmarks.harness import start_stack, stop_stack, wait_until_ready, wait_until_serving
    from benchmarks.loadgen import bounded, client, stream_chat

    def overrides(args: dict) -> None:
        args["engine"] = {"backend": "mistralrs", "max_num_seqs": 64,
                          "max_model_len": args["engine"].get("max_model_len", 2048)}
        args["replicas"] = {**args["replicas"], "num_replicas": 1}
        # The base model alone on both paths (bare has no adapters): LoRA off, no roots.
        args["adapters"] = {**args.get("adapters", {}), "allowed_roots": [], "declared": {}}

    logfile = Path(os.environ.get("TMPDIR", "/tmp")) / "backends-bench-stack.log"
    proc, url = start_stack(port, logfile, overrides)
    try:
        wait_until_ready(f"{url}/v1/models", proc, 600, "the stack")
        wait_until_serving(url, "smollm2-135m-instruct", proc, 600, "the stack")
        chat_url = f"{url}/v1/chat/completions"

        async def main() -> dict[str, Any]:
            async with client(concurrency) as http:
                def job(messages):
                    return lambda: stream_chat(http, chat_url, {
                        "model": "smollm2-135m-instruct", "messages": messages,
                        "max_tokens": OUTPUT_TOKENS, "temperature": 0, "ignore_eos": True})

                await bounded(2, [job(m) for m in prompts(2)])  # warm-up
                started = time.monotonic()
                done = await bounded(concurrency, [job(m) for m in prompts(requests)])
                wall = time.monotonic() - started
            bad = [r for r, _ in done if r.status != 200]
            if bad:
                raise RuntimeError(f"{len(bad)} stack requests failed: {bad[0]}")
            return summarize([(r.ttft_s, r.output_chunks, r.latency_s) for r, _ in done],
                             wall, concurrency, requests)

        return asyncio.run(main())
    finally:
        stop_stack(proc)
        del httpx


# -- the run ---------------------------------------------------------------------------------


def child(what: str, concurrency: list[int], timeout_s: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.backends_bench", "--child", what,
           "--concurrency", ",".join(map(str, concurrency))]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} took longer than {timeout_s:.0f} s") from None
    for line in done.stderr.splitlines():
        if line.startswith("[bench"):
            print(line, flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def base_perplexity() -> float | None:
    """The base checkpoint's held-out perplexity, as recorded by the ISQ benchmark."""
    report = ROOT / "benchmarks" / "results" / "isq" / "report.json"
    try:
        data = json.loads(report.read_text())
    except OSError:
        return None
    for key in ("base_perplexity", "base"):
        value = data.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, dict) and "perplexity" in value:
            return float(value["perplexity"])
    return None


ISQ_TYPES = {"mistralrs-q8_0": "Q8_0", "mistralrs-q4k": "Q4K", "mistralrs-q4_0": "Q4_0"}


def isq_perplexity(target: str) -> float | None:
    """The gated held-out perplexity benchmarks.mistralrs_isq_quality measured for the
    target's ISQ type (same evaluation set and code as the ISQ gate), if it has."""
    try:
        rows = json.loads((OUT / "isq_quality.json").read_text())["perplexity"]["rows"]
    except (OSError, KeyError, ValueError):
        return None
    # Where several readings of mistral.rs's rounding were scored, the worst one.
    gated = [s["perplexity"] for row in rows.values() if row.get("type") == ISQ_TYPES.get(target)
             for s in row["sets"].values() if s["gated"]]
    return max(gated) if gated else None


def write_report(out: Path, results: dict[str, Any], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    engines = results["engines"]
    base = engines.get("vllm-f32")
    if not engines:
        (out / "report.md").write_text("# vLLM-CPU vs mistral.rs\n\nNothing measured:\n\n"
                                       + "\n".join(meta.get("notes", [])) + "\n")
        return

    def at(target: str, c: int, key: str) -> float:
        for row in engines[target]["levels"]:
            if row["concurrency"] == c:
                return row[key]
        return float("nan")

    lines = ["# vLLM-CPU vs mistral.rs", "",
             f"Run {meta['date']} on {meta['cpus']} CPU cores; SmolLM2-135M-Instruct; "
             f"chat prompts of ~{meta['prompt_tokens']} tokens, {OUTPUT_TOKENS} output tokens "
             "each, greedy. Each engine target in its own process, driven through ruvllm's "
             "engine protocol.", "",
             "| target | start-up s | RSS MiB | tok/s c=1 | tok/s c=16 | tok/s c=64 | "
             "TTFT p50 / p99 ms (c=16) | held-out ppl |", "|---|---|---|---|---|---|---|---|"]
    for name, r in engines.items():
        lines.append(
            f"| {name} | {r['startup_s']:.1f} | {r['rss_mib']:.0f} | "
            + " | ".join(f"{at(name, c, 'output_tok_per_s'):.1f}" for c in (1, 16, 64))
            + f" | {at(name, 16, 'ttft_p50_ms'):.0f} / {at(name, 16, 'ttft_p99_ms'):.0f} | "
            + (f"{r['perplexity']:.2f}" if r.get("perplexity") else "not measurable") + " |")
    if base:
        lines += ["", "Ratios against vllm-f32 in the same run:", ""]
        for name, r in engines.items():
            if name == "vllm-f32":
                continue
            lines.append(f"- {name}: decode at c=1 "
                         f"{at(name, 1, 'output_tok_per_s') / at('vllm-f32', 1, 'output_tok_per_s'):.2f}x, "
                         f"c=64 {at(name, 64, 'output_tok_per_s') / at('vllm-f32', 64, 'output_tok_per_s'):.2f}x, "
                         f"memory {r['rss_mib'] / base['rss_mib']:.2f}x")
    stack = results.get("stack_vs_bare")
    if stack:
        ratio = stack["stack"]["output_tok_per_s"] / stack["bare"]["output_tok_per_s"]
        lines += ["", f"mistral.rs through the stack vs bare at c={stack['concurrency']} "
                  f"(measured {stack.get('date', meta['date'])}): "
                  f"{stack['stack']['output_tok_per_s']:.1f} vs "
                  f"{stack['bare']['output_tok_per_s']:.1f} tok/s ({ratio:.2f}x)."]
    lines += ["", *meta.get("notes", [])]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(out, engines)


def plot(out: Path, engines: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in engines.items():
        cs = [row["concurrency"] for row in r["levels"]]
        ax1.plot(cs, [row["output_tok_per_s"] for row in r["levels"]], marker="o", label=name)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("output tokens/s")
    ax1.legend(fontsize=8)
    names = list(engines)
    ax2.bar(names, [engines[n]["rss_mib"] for n in names])
    ax2.set_ylabel("resident MiB per engine")
    ax2.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="'' keeps the engines of the existing report and reruns only "
                             "the stack-vs-bare comparison (with --skip-stack: only "
                             "rewrites the report, e.g. after a new isq_quality.json)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--stack-port", type=int, default=8731)
    parser.add_argument("--skip-stack", action="store_true")
    parser.add_argument("--target-timeout-s", type=float, default=240)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.child:
        sys.stdout = sys.__stdout__
        if args.child == "bare16":
            result = run_bare_mistralrs(16, 32)
        elif args.child == "stack16":
            result = run_stack_mistralrs(16, 32, args.stack_port)
        else:
            result = run_target(args.child, concurrency)
        print(json.dumps(result))
        return 0
    engines, notes = {}, []
    saved = None
    if not args.targets:  # only the stack-vs-bare comparison, beside the engines measured before
        saved = json.loads((args.out / "report.json").read_text())
        engines = saved["results"]["engines"]
        notes = [n for n in saved["meta"]["notes"] if not n.startswith("- stack vs bare")]
    for target in filter(None, args.targets.split(",")):
        log(f"{target}: starting")
        try:
            engines[target] = child(target, concurrency, args.target_timeout_s)
        except RuntimeError as e:  # one slow or failing target must not lose the others
            log(f"{target}: {e}")
            notes.append(f"- {target}: not measured: {str(e).splitlines()[0]}")
    ppl = base_perplexity()
    for name in ("vllm-f32", "mistralrs-f32", "mistralrs-gguf"):
        if name in engines:  # same weights as the base checkpoint (see the docstring)
            engines[name]["perplexity"] = ppl
    for name in ISQ_TYPES:
        if name in engines:
            engines[name]["perplexity"] = isq_perplexity(name)
    results: dict[str, Any] = {"engines": engines}
    if saved and args.skip_stack and "stack_vs_bare" in saved["results"]:
        results["stack_vs_bare"] = saved["results"]["stack_vs_bare"]
    if not args.skip_stack:
        log("mistral.rs bare vs through the stack at c=16")
        try:
            results["stack_vs_bare"] = {
                "concurrency": 16, "bare": child("bare16", [16], args.target_timeout_s),
                "stack": child("stack16", [16], 2 * args.target_timeout_s)}
        except RuntimeError as e:
            notes.append(f"- stack vs bare: not measured: {str(e).splitlines()[0]}")
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta = {"date": saved["meta"]["date"] if saved else now,
            "cpus": len(os.sched_getaffinity(0)), "prompt_tokens": 60, "notes": notes}
    if "stack_vs_bare" in results:  # measured now, or kept from the saved report
        results["stack_vs_bare"].setdefault("date", meta["date"] if saved else now)
        if not args.skip_stack:
            results["stack_vs_bare"]["date"] = now
    write_report(args.out, results, meta)
    log(f"report in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
