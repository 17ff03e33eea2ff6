"""Throughput and latency of the ruvllm stack against bare vLLM, in one run.

    make bench                       # or: python -m benchmarks.serve_vs_vllm --help

Targets, measured one after another on the same machine and model, under the same load
(vLLM's own `vllm bench serve` client: random 128-token prompts, 128 output tokens,
64 concurrent chat streams):

  bare     vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`), one
           engine with vLLM's default CPU binding;
  stack    `serve run` of cluster.yaml as shipped (ingress + router + 2 replicas);
  stack-1  the same app with one replica bound like bare vLLM: the overhead of the
           serving path alone (proxy -> ingress -> router -> replica).

Writes report.json, report.md and report.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import MODEL, ROOT, engine_settings, log, running, start_stack

PERCENTILES = (50, 90, 99)


def start_bare_vllm(model_path: Path, port: int, logfile: Path) -> tuple[subprocess.Popen, str]:
    e = engine_settings()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path), "--served-model-name", MODEL, "--port", str(port),
        "--dtype", "float32", "--max-model-len", str(e["max_model_len"]),
        "--max-num-seqs", str(e["max_num_seqs"]), "--block-size", str(e["block_size"]),
        "--enable-prefix-caching", "--disable-uvicorn-access-log",
    ]
    if e.get("enable_lora"):  # the same engine as the stack's replicas
        cmd += ["--enable-lora", "--max-loras", str(e["max_loras"]),
                "--max-cpu-loras", str(e["max_cpu_loras"]),
                "--max-lora-rank", str(e["max_lora_rank"])]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(e["cpu_kvcache_space_gib"]),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=logfile.open("w"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def run_load(base_url: str, model_path: Path, args: argparse.Namespace, out: Path, name: str,
             model_name: str = MODEL) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    bench_args = parser.parse_args([
        "--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
        "--model", model_name, "--tokenizer", str(model_path),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.concurrency), "--ignore-eos", "--temperature", "0",
        "--num-warmups", str(min(args.concurrency, 16)), "--seed", str(getattr(args, "seed", 0)),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", ",".join(str(p) for p in PERCENTILES),
        "--save-result", "--result-dir", str(out), "--result-filename", f"raw-{name}.json",
    ])
    return main(bench_args)


def summarize(result: dict) -> dict[str, float]:
    keys = ["output_throughput", "request_throughput", "completed", "failed", "duration"]
    for metric in ("ttft", "itl", "tpot", "e2el"):
        keys.append(f"mean_{metric}_ms")
        keys += [f"p{p}_{metric}_ms" for p in PERCENTILES]
    return {k: result[k] for k in keys if k in result}


def write_report(out: Path, targets: dict[str, dict], meta: dict) -> None:
    bare = targets.get("bare", {}).get("output_throughput")
    for name, s in targets.items():
        if bare and name != "bare":
            s["throughput_ratio_vs_bare"] = s["output_throughput"] / bare
    report = {"meta": meta, "targets": targets}
    (out / "report.json").write_text(json.dumps(report, indent=2))

    lines = [
        "# ruvllm stack vs bare vLLM",
        "",
        f"Measured {meta['date']} on {meta['machine']}; model {MODEL} (float32); "
        f"{meta['num_prompts']} chat requests, {meta['concurrency']} concurrent streams, "
        f"{meta['input_len']} random prompt tokens, {meta['output_len']} output tokens "
        f"(ignore_eos); load client: vLLM's `vllm bench serve`.",
        "",
        f"Engine settings, the same for every target (cluster.yaml): {meta['engine']}. "
        "bare = vLLM's OpenAI server with vLLM's default CPU binding; stack = cluster.yaml as "
        "shipped (2 replicas, each engine on its own core); stack-1 = one replica bound like "
        "bare vLLM. Ray workers run at niceness 0 (`RAY_worker_niceness=0`, as `make serve` "
        "starts them; Ray's default 15 cost the stack 11% here).",
        "",
        "| target | output tok/s | ratio vs bare | TTFT p50 / p90 / p99 (ms) "
        "| ITL p50 / p90 / p99 (ms) | failed | startup (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in targets.items():
        ratio = s.get("throughput_ratio_vs_bare")
        ttft = " / ".join(f"{s.get(f'p{p}_ttft_ms', float('nan')):.0f}" for p in PERCENTILES)
        itl = " / ".join(f"{s.get(f'p{p}_itl_ms', float('nan')):.0f}" for p in PERCENTILES)
        lines.append(
            f"| {name} | {s['output_throughput']:.1f} | "
            f"{'—' if ratio is None else f'{ratio:.2f}x'} | {ttft} | {itl} | "
            f"{s.get('failed', 0)} | {s.get('startup_s', 0):.0f} |")
    lines += ["", "Targets: " + "; ".join(f"**{k}**: {v}" for k, v in meta["targets"].items()),
              "", "![throughput and latency](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot(out, targets)


def plot(out: Path, targets: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(targets)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].bar(names, [targets[n]["output_throughput"] for n in names], color="tab:blue")
    axes[0].set_title("output tokens/s (higher is better)")
    for ax, metric in zip(axes[1:], ("ttft", "itl")):
        width = 0.8 / len(PERCENTILES)
        for i, p in enumerate(PERCENTILES):
            xs = [j + i * width for j in range(len(names))]
            ax.bar(xs, [targets[n].get(f"p{p}_{metric}_ms", 0) for n in names], width,
                   label=f"p{p}")
        ax.set_xticks([j + width for j in range(len(names))], names)
        ax.set_title(f"{metric.upper()} ms (lower is better)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="bare,stack,stack-1")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=192)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_vs_vllm")
    parser.add_argument("--startup-timeout", type=float, default=900)
    args = parser.parse_args()

    from ruvllm.model_store import prepare_builtin

    os.environ["HF_HUB_OFFLINE"] = "1"
    model_path = prepare_builtin(MODEL)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)

    def one_replica(a: dict) -> None:
        a["replicas"]["num_replicas"] = 1
        a["engine"]["cpu_threads_bind"] = "auto"  # vLLM's default, as bare vLLM runs

    starters = {
        "bare": lambda: start_bare_vllm(model_path, 8100, logs / "bare.log"),
        "stack": lambda: start_stack(8200, logs / "stack.log", lambda a: None),
        "stack-1": lambda: start_stack(8300, logs / "stack-1.log", one_replica),
    }
    results: dict[str, dict] = {}
    for name in args.targets.split(","):
        ready_log = None if name == "bare" else logs / f"{name}.log"
        with running(name, starters[name], args.startup_timeout, ready_log=ready_log) as (url, ready):
            log(f"{name}: ready in {ready:.0f} s; driving load")
            summary = summarize(run_load(url, model_path, args, args.out, name))
            summary["startup_s"] = ready
            results[name] = summary
            log(f"{name}: {summary['output_throughput']:.1f} output tok/s, "
                f"TTFT p99 {summary.get('p99_ttft_ms', 0):.0f} ms")

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPU cores, no GPU (vLLM CPU build)",
        "concurrency": args.concurrency, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len,
        "targets": {"stack throughput": ">= 0.9x bare vLLM"},
        "engine": ", ".join(f"{k}={v}" for k, v in engine_settings().items()),
    }
    write_report(args.out, results, meta)
    log(f"report: {args.out / 'report.md'}")
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
