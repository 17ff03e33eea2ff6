"""The ruvllm stack against bare vLLM on one GPU, in one run (issue 14, benchmark a).

    python -m benchmarks.gpu_stack_vs_vllm [--concurrency 1,16,64,128] [--targets bare,stack]

Model: Llama-3-8B's shape (32 layers, hidden 4096, GQA 32/8, vocab 128,256) with random bf16
weights, built on the GPU in seconds (no hub here), and the default model's tokenizer (its
49,152 ids fit the 128,256-row embedding). Random weights decode at the same speed as
trained ones: the work per token is the same matrix shapes.

Targets, one after the other on the same GPU, with the same engine settings
(cluster-gpu.yaml's: bf16, block 16, gpu_memory_utilization 0.85, prefix caching, LoRA on
with 4 slots of rank 16, max_num_seqs 256):

  bare     vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`);
  stack    `serve run cluster-gpu.yaml`, one engine replica, the model above;
  stack-tput  `stack` under Ray Serve's high-throughput flags (RAY_SERVE_THROUGHPUT_OPTIMIZED:
           direct ingress and gRPC between replicas; RAY_SERVE_ENABLE_HA_PROXY: HAProxy
           instead of the Python HTTP proxy);
  stack-2  the same with two replicas, one per GPU (benchmark d: needs two GPUs; run it
           with `--targets stack,stack-2 --concurrency 128`); stack-2-tput likewise;
  stack-i4, stack-tput-i4  one engine replica behind four ingress replicas (admission
           then runs per ingress: each has its own queue and tenant shares);
  stack-2-tput-i4  two replicas on two GPUs behind four ingress replicas (benchmark d
           without one ingress's CPU as the ceiling).

Load: vLLM's own `vllm bench serve` client, random 512-token prompts, 256 output tokens
(ignore_eos), chat endpoint, at each concurrency. Writes report.json / report.md /
report.png under --out; every absolute figure names the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import ROOT, engine_settings, log, running, start_stack
from benchmarks.serve_vs_vllm import run_load, summarize
from benchmarks.server_timing_probe import LoadProbe, describe, sequential
from benchmarks.ttft_breakdown import PHASES
from ruvllm.serve_mode import DEFAULT_MODE_FLAGS, THROUGHPUT_FLAGS

SERVED = "llama8b-random"
GPU_CONFIG = ROOT / "cluster-gpu.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def build_random_llama(path: Path, tokenizer_from: Path) -> float:
    """Llama-3-8B-shaped checkpoint, random bf16 weights (seeded), the given tokenizer."""
    if (path / ".ready").exists():
        return 0.0
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(str(path), max_shard_size="5GB")
    del model
    torch.cuda.empty_cache()
    copy_tokenizer(tokenizer_from, path)
    (path / ".ready").write_text("ok")
    return time.monotonic() - started


def copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer and generation files of checkpoint `src` into `dst` (those it has)."""
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def start_bare(model: Path, port: int, logfile: Path) -> tuple[subprocess.Popen, str]:
    e = engine_settings(GPU_CONFIG)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model), "--served-model-name", SERVED, "--port", str(port),
           "--dtype", e["dtype"], "--block-size", str(e["block_size"]),
           "--gpu-memory-utilization", str(e["gpu_memory_utilization"]),
           "--max-model-len", str(e["max_model_len"]), "--max-num-seqs", str(e["max_num_seqs"]),
           "--enable-prefix-caching", "--disable-uvicorn-access-log", "--seed", "0"]
    if e.get("enable_lora"):
        cmd += ["--enable-lora", "--max-loras", str(e["max_loras"]),
                "--max-cpu-loras", str(e["max_cpu_loras"]), "--max-lora-rank", str(e["max_lora_rank"])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return (subprocess.Popen(cmd, env=env, stdout=logfile.open("w"), stderr=subprocess.STDOUT),
            f"http://127.0.0.1:{port}")




def start_stack_on(model: Path, port: int, logfile: Path, replicas: int = 1,
                   env_vars: dict[str, str] | None = None,
                   ingresses: int = 1) -> tuple[subprocess.Popen, str]:
    def use_model(args: dict) -> None:
        args["model"] = {"source": str(model), "served_name": SERVED}
        args["replicas"]["num_replicas"] = replicas
        args["ingress"]["num_replicas"] = ingresses

    return start_stack(port, logfile, use_model, GPU_CONFIG, env_vars)


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip().splitlines()
    except FileNotFoundError:  # a CPU host (a smoke run of a GPU benchmark's plumbing)
        return "no GPU"
    return out[0] if out else "unknown GPU"


def gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len(visible.split(","))
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return len(out.strip().splitlines())


def wait_for_gpu_memory(limit_mib: int = 4096, timeout_s: float = 120) -> None:
    """The next target's vLLM sizes its KV cache from free memory: start it on an empty card.
    Only this process's GPUs count (CUDA_VISIBLE_DEVICES): another job may hold the rest."""
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        query += ["-i", os.environ["CUDA_VISIBLE_DEVICES"]]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        used = subprocess.run(query, capture_output=True, text=True).stdout.split()
        if used and max(int(u) for u in used) < limit_mib:
            return
        time.sleep(2)
    log(f"GPU memory still in use after {timeout_s:.0f} s: {used} MiB")


def sweep(url: str, model: Path, concurrencies: list[int], args, out: Path, name: str,
          probes: dict) -> dict:
    """The load at each concurrency, `args.repeats` times; each run draws its own random
    prompts (seed = 1000 x repeat + concurrency), so no run finds an earlier run's prompts in
    the prefix cache: with one seed for the whole sweep, c=128 after c=64 found half its
    prompts cached and ran 1.19x faster (bare, 12-01 00:30 and 00:49 UTC). A row is the run
    with the median throughput, beside every run's figure. For the stack above c=1 a
    Server-Timing probe runs beside the first run (benchmarks/server_timing_probe.py), and
    after the sweep every target gets a sequential probe (its concurrency-1 breakdown)."""
    rows = {}
    for c in concurrencies:
        runs = []
        for repeat in range(args.repeats):
            load = argparse.Namespace(input_len=args.input_len, output_len=args.output_len,
                                      concurrency=c, num_prompts=max(args.min_prompts, 4 * c),
                                      seed=1000 * repeat + c)
            if c == 1:
                load.num_prompts = args.min_prompts
            tag = f"{name}-c{c}" + (f"-r{repeat}" if repeat else "")
            probe = (LoadProbe(url, SERVED) if args.probe and c > 1 and name != "bare"
                     and repeat == 0 else None)
            if probe:
                with probe:
                    result = run_load(url, model, load, out, tag, SERVED)
                probes[f"c{c}"] = probe.summary()
                log(f"{name} c={c} probe: {describe(probes[f'c{c}'])}")
            else:
                result = run_load(url, model, load, out, tag, SERVED)
            r = summarize(result)
            runs.append(r)
            log(f"{name} c={c} run {repeat + 1}/{args.repeats}: {r['output_throughput']:.0f} "
                f"tok/s, TTFT p50 {r.get('p50_ttft_ms', 0):.1f} ms, TPOT p50 "
                f"{r.get('p50_tpot_ms', 0):.2f} ms, failed {r.get('failed', 0)}")
        rows[str(c)] = median_run(runs)
    if args.probe:
        probes["c1-sequential"] = sequential(url, SERVED)
        log(f"{name} sequential probe: {describe(probes['c1-sequential'])}")
    return rows


def median_run(runs: list[dict]) -> dict:
    """The run of median output throughput (the lower middle one of an even count), with
    every run's throughput and TTFT p50 beside it when there was more than one."""
    ordered = sorted(runs, key=lambda r: r["output_throughput"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        row["runs_output_throughput"] = [r["output_throughput"] for r in runs]
        row["runs_p50_ttft_ms"] = [r.get("p50_ttft_ms") for r in runs]
    return row


def probe_lines(results: dict) -> list[str]:
    """The probes' table: client times and the stack's Server-Timing phases (medians)."""
    rows = [(n, k, s) for n, t in results.items() for k, s in t.get("probes", {}).items()
            if s.get("probes")]
    if not rows:
        return []
    lines = ["## Where the time to first token goes (probe requests, medians in ms)", "",
             "Short streaming requests (~128 prompt tokens, 16 output) sent one per second "
             "beside the load (`cN`), or one after another on the idle server "
             "(`c1-sequential`); the stack's `Server-Timing` header splits its time before "
             "the reply head (benchmarks/server_timing_probe.py).", "",
             "| target | during | probes | to headers | TTFT | ingress | admission | replica | hop |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, during, s in rows:
        st = s.get("server_timing_ms", {})
        cells = " | ".join(f"{st[p]:.1f}" if p in st else "—" for p in PHASES)
        lines.append(f"| {name} | {during} | {s['probes']} | {s['headers_ms']:.1f} | "
                     f"{s['ttft_ms']:.1f} | {cells} |")
    return lines + [""]


def scaling_lines(results: dict) -> list[str]:
    """Benchmark d: two replicas against one at each concurrency both ran, beside the
    ceiling bare vLLM's own rows set: two engines each at c/2 against one engine at c,
    i.e. 2 x bare(c/2) / bare(c), what perfect routing with no overhead would give."""
    bare = results.get("bare", {}).get("rows", {})
    pairs = [(two, one) for two, one in (("stack-2-tput", "stack-tput"), ("stack-2", "stack"),
                                         ("stack-2-tput-i4", "stack-tput-i4"))
             if two in results and one in results]
    if not pairs:
        return []
    lines = ["## Two replicas on two GPUs against one (benchmark d)", "",
             "| two replicas | one replica | concurrency | two (tok/s) | one (tok/s) | ratio "
             "| bare ceiling 2 x bare(c/2) / bare(c) |", "|---|---|---|---|---|---|---|"]
    for two, one in pairs:
        rows2, rows1 = results[two]["rows"], results[one]["rows"]
        for c in (c for c in rows2 if c in rows1):
            t2, t1 = rows2[c]["output_throughput"], rows1[c]["output_throughput"]
            half = str(int(c) // 2)
            ceiling = (f"{2 * bare[half]['output_throughput'] / bare[c]['output_throughput']:.2f}x"
                       if half in bare and c in bare else "—")
            lines.append(f"| {two} | {one} | {c} | {t2:.0f} | {t1:.0f} | {t2 / t1:.2f}x | "
                         f"{ceiling} |")
    return lines + [""]


def write_report(out: Path, results: dict, meta: dict) -> None:
    peer_name = meta.get("peer", "bare")
    peer = results.get(peer_name, {}).get("rows", {})
    for name, target in results.items():
        for c, row in target["rows"].items():
            if name != peer_name and c in peer:
                row["throughput_ratio_vs_bare"] = row["output_throughput"] / peer[c]["output_throughput"]
                row["ttft_p50_delta_ms"] = row["p50_ttft_ms"] - peer[c]["p50_ttft_ms"]
    (out / "report.json").write_text(json.dumps({"meta": meta, "targets": results}, indent=2))
    lines = [
        "# ruvllm stack vs bare vLLM on a GPU",
        "",
        f"Measured {meta['date']} on **{meta.get('gpus', 1)} x {meta['gpu']}** (vLLM {meta['vllm']}, Ray {meta['ray']}), "
        f"one lease, the same GPU(s) for every target"
        + (f" ({', '.join(meta['kept'])} measured earlier in it, {next(iter(meta['kept'].values()))})"
           if meta.get("kept") else "") + f". Model: Llama-3-8B shape, random bf16 weights, "
        f"the default model's tokenizer. {meta['input_len']} random prompt tokens, "
        f"{meta['output_len']} output tokens (ignore_eos), chat endpoint, `vllm bench serve`."
        + (f" Each row is the median of {meta['repeats']} runs, each on prompts of its own "
           "(range in brackets)." if meta.get("repeats", 1) > 1 else ""),
        "",
        f"Engine settings for both (cluster-gpu.yaml): {meta['engine']}.",
        "",
        f"| target | concurrency | requests | output tok/s | ratio vs {peer_name} | TTFT p50 / p99 (ms) "
        f"| TTFT p50 vs {peer_name} | TPOT p50 (ms) | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, target in results.items():
        for c, r in target["rows"].items():
            ratio = r.get("throughput_ratio_vs_bare")
            delta = r.get("ttft_p50_delta_ms")
            p99 = f"{r['p99_ttft_ms']:.1f}" if "p99_ttft_ms" in r else "—"
            runs = r.get("runs_output_throughput")
            spread = f" ({min(runs):.0f}-{max(runs):.0f})" if runs else ""
            lines.append(
                f"| {name} | {c} | {r['completed']} | {r['output_throughput']:.0f}{spread} | "
                f"{'—' if ratio is None else f'{ratio:.3f}x'} | "
                f"{r.get('p50_ttft_ms', 0):.1f} / {p99} | "
                f"{'—' if delta is None else f'{delta:+.1f} ms'} | "
                f"{r.get('p50_tpot_ms', 0):.2f} | {r.get('failed', 0)} |")
    lines += ["", "Start-up (s): " + ", ".join(
        f"{n} {t['startup_s']:.0f}" if t.get("startup_s") is not None else f"{n} —"
        for n, t in results.items()), "",
        "Targets (issue 14): stack output throughput >= 0.95x bare at c=64 and c=128; "
        "TTFT p50 at c=1 within +10 ms of bare; two replicas on two GPUs >= 1.8x one "
        "replica at c=128.", ""]
    if meta.get("failed_targets"):
        lines += ["Failed targets: " + "; ".join(f"{n}: {e}" for n, e in meta["failed_targets"].items()), ""]
    lines += scaling_lines(results)
    lines += probe_lines(results)
    if meta.get("notes"):
        lines += ["## Notes", ""] + [f"- {note}" for note in meta["notes"]] + [""]
    lines += ["![throughput and TTFT](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot(out, results, meta)


def plot(out: Path, results: dict, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, target in results.items():
        cs = [int(c) for c in target["rows"]]
        rows = list(target["rows"].values())
        axes[0].plot(cs, [r["output_throughput"] for r in rows], marker="o", label=name)
        axes[1].plot(cs, [r.get("p50_ttft_ms", 0) for r in rows], marker="o", label=name)
    for ax, title in zip(axes, ("output tokens/s (higher is better)", "TTFT p50 ms (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"stack vs bare vLLM, 8B-shape bf16, {meta['gpu']}")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="bare,stack")
    parser.add_argument("--peer", default="bare", help="the target the ratios compare against")
    parser.add_argument("--concurrency", default="1,16,64,128")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--min-prompts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per concurrency, each on fresh prompts; a row is their median")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/llama8b-random"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_stack_vs_vllm")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--probe", action="store_true",
                        help="Server-Timing probes beside the load and after it (see above)")
    parser.add_argument("--concurrency-of", action="append", default=[], metavar="TARGET=C,C",
                        help="another concurrency list for one target (e.g. "
                        "stack-2-tput=128,256 for benchmark d)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the targets of --out's report.json that this run does not "
                        "measure (a target run earlier in the same lease, e.g. bare on one "
                        "GPU while the tests held the other)")
    parser.add_argument("--rewrite-report", action="store_true",
                        help="re-render report.md/.png from report.json (e.g. after editing notes)")
    args = parser.parse_args()
    if args.rewrite_report:
        saved = json.loads((args.out / "report.json").read_text())
        write_report(args.out, saved["targets"], saved["meta"])
        return 0

    import ray
    import vllm

    from ruvllm.model_store import prepare_builtin

    os.environ["HF_HUB_OFFLINE"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    built = build_random_llama(args.model_dir, prepare_builtin("smollm2-135m-instruct"))
    log(f"model at {args.model_dir} ({built:.0f} s to build)")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    starters = {"bare": lambda: start_bare(args.model_dir, 8100, logs / "bare.log"),
                "stack": lambda: start_stack_on(args.model_dir, 8200, logs / "stack.log",
                                                env_vars=DEFAULT_MODE_FLAGS),
                "stack-2": lambda: start_stack_on(args.model_dir, 8300, logs / "stack-2.log", 2,
                                                  env_vars=DEFAULT_MODE_FLAGS),
                "stack-tput": lambda: start_stack_on(args.model_dir, 8400, logs / "stack-tput.log",
                                                     env_vars=THROUGHPUT_FLAGS),
                "stack-2-tput": lambda: start_stack_on(args.model_dir, 8900,
                                                       logs / "stack-2-tput.log", 2,
                                                       env_vars=THROUGHPUT_FLAGS),
                "stack-tput-i4": lambda: start_stack_on(args.model_dir, 8600,
                                                        logs / "stack-tput-i4.log",
                                                        env_vars=THROUGHPUT_FLAGS, ingresses=4),
                "stack-i4": lambda: start_stack_on(args.model_dir, 8700, logs / "stack-i4.log",
                                                   env_vars=DEFAULT_MODE_FLAGS, ingresses=4),
                "stack-2-tput-i4": lambda: start_stack_on(args.model_dir, 8800,
                                                          logs / "stack-2-tput-i4.log", 2,
                                                          env_vars=THROUGHPUT_FLAGS, ingresses=4)}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": gpu_name(),
            "vllm": vllm.__version__, "ray": ray.__version__, "input_len": args.input_len,
            "output_len": args.output_len, "peer": args.peer, "gpus": gpu_count(),
            "repeats": args.repeats,
            "engine": ", ".join(f"{k}={v}" for k, v in engine_settings(GPU_CONFIG).items()
                                if v is not None)}
    results: dict[str, dict] = {}
    if args.keep and (args.out / "report.json").is_file():
        saved = json.loads((args.out / "report.json").read_text())
        results = {n: t for n, t in saved["targets"].items() if n not in args.targets.split(",")}
        meta["kept"] = {n: saved["meta"]["date"] for n in results}
    own = {k: [int(c) for c in v.split(",")]
           for k, v in (item.split("=", 1) for item in args.concurrency_of)}
    for name in args.targets.split(","):
        try:
            ready_log = None if name == "bare" else logs / f"{name}.log"
            with running(name, starters[name], args.startup_timeout, SERVED,
                         ready_log) as (url, ready):
                log(f"{name}: serving after {ready:.0f} s")
                probes: dict = {}
                results[name] = {"startup_s": ready, "probes": probes, "rows": sweep(
                    url, args.model_dir, own.get(name, concurrencies), args, args.out, name,
                    probes)}
        except Exception as e:  # a target that fails is reported; the others still run
            log(f"{name}: failed: {e!r}")
            meta.setdefault("failed_targets", {})[name] = repr(e)[:300]
        wait_for_gpu_memory()
        write_report(args.out, results, meta)  # what was measured survives a later failure
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
