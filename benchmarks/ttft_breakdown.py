"""Where the stack's extra time to first token goes, against bare vLLM in the same run.

    python -m benchmarks.ttft_breakdown [--requests 30] [--serve-mode default|throughput]

One client, one request at a time (concurrency 1), streaming chat, each prompt unique
from its first token (no prefix-cache hits), ~128 prompt tokens, 16 output tokens. For
each target it records the time to the response headers and to the first content
chunk; for the stack also the `Server-Timing` phases (deployments/server_timing.py).
The stack runs with one engine replica bound like bare vLLM (as `serve_vs_vllm`'s
stack-1), so both have the same engine. By default (`--serve-mode throughput`) the stack runs in Ray
Serve's high-throughput mode (core/serve_mode.py: the ingress replica serves HTTP itself
behind HAProxy, no Python proxy hop, no call back to the proxy for the body, user code
on each replica's own event loop), with Serve's console log kept on as the CPU default has it.

What the difference splits into:
  before the headers  ingress (parse, template, token count) + admission + hop (routing,
                      Ray to the replica and back) + HTTP proxy; the replica's own
                      preprocessing is bare vLLM's too, so it cancels out;
  after the headers   prefill (the same engine) + the first chunk's way back through Ray,
                      the ingress and the proxy.
Writes report.json / report.md / report.png under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from benchmarks.harness import MODEL, ROOT, log, running, start_stack
from ruvllm.deployments.server_timing import parse

WORDS = ("river stone lantern orbit meadow copper signal harbor velvet thunder quartz "
         "falcon ember glacier willow saffron cobalt prism canyon breeze").split()
PHASES = ("ingress", "admission", "replica", "hop")


def prompt(i: int) -> str:
    # A different first word per request: no two prompts share a prefix-cache block.
    words = [f"{i}-{WORDS[i % len(WORDS)]}"] + [WORDS[(i * 7 + k) % len(WORDS)] for k in range(110)]
    return "Summarise these words in one sentence: " + " ".join(words)


def _has_content(chunk: str) -> bool:
    choices = json.loads(chunk).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


def one_request(client: httpx.Client, url: str, i: int, model: str = MODEL) -> dict:
    body = {"model": model, "stream": True, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": prompt(i)}]}
    started = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        headers_ms = (time.perf_counter() - started) * 1000
        ttft_ms = None
        for line in r.iter_lines():
            if ttft_ms is None and line.startswith("data: {") and _has_content(line[6:]):
                ttft_ms = (time.perf_counter() - started) * 1000
        r.raise_for_status()
    row = {"headers_ms": headers_ms, "ttft_ms": ttft_ms}
    if "server-timing" in r.headers:
        row["server_timing"] = parse(r.headers["server-timing"])
    return row


def measure(url: str, requests: int, offset: int) -> list[dict]:
    with httpx.Client(timeout=120) as client:
        for i in range(3):  # warm-up: first-request costs are not the path's
            one_request(client, url, offset + 1000 + i)
        return [one_request(client, url, offset + i) for i in range(requests)]


def p50(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows if r[key] is not None)


def summarize(rows: list[dict]) -> dict:
    s = {"headers_ms": p50(rows, "headers_ms"), "ttft_ms": p50(rows, "ttft_ms")}
    s["after_headers_ms"] = s["ttft_ms"] - s["headers_ms"]
    timed = [r["server_timing"] for r in rows if "server_timing" in r]
    if timed:
        s["server_timing_ms"] = {p: statistics.median(t.get(p, 0.0) for t in timed) for p in PHASES}
    return s


def write_report(out: Path, result: dict) -> None:
    (out / "report.json").write_text(json.dumps(result, indent=2))
    bare, stack = result["targets"]["bare"], result["targets"]["stack"]
    st = stack.get("server_timing_ms", {})
    d_head = stack["headers_ms"] - bare["headers_ms"]
    d_after = stack["after_headers_ms"] - bare["after_headers_ms"]
    counted = st.get("ingress", 0) + st.get("admission", 0) + st.get("hop", 0)
    lines = [
        "# Time to first token: the stack against bare vLLM, broken down", "",
        f"Measured {result['date']} on {result['machine']}, one run, concurrency 1, "
        f"{result['requests']} streaming chat requests per target (~128 prompt tokens, unique "
        "prefixes, 16 output tokens), medians. The stack: one engine replica bound like bare vLLM, "
        f"Ray Serve in its {result.get('serve_mode', 'default')} mode.", "",
        "| | bare vLLM | stack | stack − bare |", "|---|---|---|---|",
        f"| time to headers (ms) | {bare['headers_ms']:.1f} | {stack['headers_ms']:.1f} | {d_head:+.1f} |",
        f"| headers → first token (ms) | {bare['after_headers_ms']:.1f} | {stack['after_headers_ms']:.1f} | {d_after:+.1f} |",
        f"| **TTFT (ms)** | {bare['ttft_ms']:.1f} | {stack['ttft_ms']:.1f} | "
        f"**{stack['ttft_ms'] - bare['ttft_ms']:+.1f}** |", "",
        "The stack's time before its headers, from its `Server-Timing` header (medians, ms):", "",
        "| ingress | admission | replica | hop | ingress + admission + hop | rest of the headers difference |",
        "|---|---|---|---|---|---|",
        f"| {st.get('ingress', 0):.2f} | {st.get('admission', 0):.2f} | {st.get('replica', 0):.2f} | "
        f"{st.get('hop', 0):.2f} | {counted:.2f} | {d_head - counted:+.2f} |", "",
        "`replica` is the replica's own validation, chat template and tokenization before its "
        "reply head, which bare vLLM does as well; `hop` is routing plus Ray's transport to the "
        "replica and back; the rest of the headers difference is the HTTP proxy and what the "
        "header cannot see. After the headers both run the same prefill; the stack's extra there "
        "is the first chunk's way back (Ray stream item, ingress, proxy).", "",
    ] + [f"- {n}" for n in result.get("notes", [])] + ["", "![breakdown](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot(out, result)


def plot(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bare, stack = result["targets"]["bare"], result["targets"]["stack"]
    st = stack.get("server_timing_ms", {})
    fig, ax = plt.subplots(figsize=(8, 3.2))
    parts = {"bare": [("to headers", bare["headers_ms"]), ("to first token", bare["after_headers_ms"])],
             "stack": [(p, st.get(p, 0.0)) for p in PHASES]
             + [("proxy & rest", stack["headers_ms"] - sum(st.get(p, 0.0) for p in PHASES)),
                ("to first token", stack["after_headers_ms"])]}
    colors = {"to headers": "#999999", "to first token": "#4c72b0", "ingress": "#dd8452",
              "admission": "#55a868", "replica": "#8172b3", "hop": "#c44e52", "proxy & rest": "#937860"}
    for y, (name, segs) in enumerate(parts.items()):
        left = 0.0
        for label, width in segs:
            ax.barh(y, width, left=left, color=colors[label], label=label if y or label != "to first token" else None)
            left += width
    ax.set_yticks(range(len(parts)), list(parts))
    ax.set_xlabel("ms (medians, concurrency 1)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    ax.set_title("Time to first token, broken down")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120)


def write_summary(out: Path, modes: list[str], notes: list[str]) -> None:
    """report.md/.json/.png under `out` from the runs in out/<mode>/report.json: each run
    is the stack in one Serve mode against bare vLLM in that same run."""
    runs = {m: json.loads((out / m / "report.json").read_text()) for m in modes}
    rows = []
    for folder, r in runs.items():
        bare, stack = r["targets"]["bare"], r["targets"]["stack"]
        st = stack.get("server_timing_ms", {})
        rows.append({"mode": r.get("serve_mode", "default"), "folder": folder,
                     "date": r["date"], "bare_ttft_ms": bare["ttft_ms"],
                     "stack_ttft_ms": stack["ttft_ms"],
                     "delta_ttft_ms": stack["ttft_ms"] - bare["ttft_ms"],
                     "delta_headers_ms": stack["headers_ms"] - bare["headers_ms"],
                     "delta_after_headers_ms": stack["after_headers_ms"] - bare["after_headers_ms"],
                     **{f"{p}_ms": st.get(p, 0.0) for p in PHASES},
                     "proxy_and_rest_ms": stack["headers_ms"] - bare["headers_ms"]
                     - sum(st.get(p, 0.0) for p in PHASES if p != "replica")})
    (out / "report.json").write_text(json.dumps({"runs": rows, "notes": notes}, indent=2))
    lines = ["# Time to first token: the stack against bare vLLM, broken down", "",
             "Concurrency 1, streaming chat, ~128 prompt tokens with unique prefixes, 16 output "
             "tokens, medians of 30 requests per target; each run measures bare vLLM and the "
             "stack (one engine replica bound like bare) one after the other; each run's "
             "details in its folder.", "",
             "| Serve mode | run | bare TTFT | stack TTFT | **stack − bare** | of it: before headers "
             "| after headers | ingress | admission | replica | hop | proxy & rest |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | [{r['date']}]({r['folder']}/report.md) | {r['bare_ttft_ms']:.1f} | "
            f"{r['stack_ttft_ms']:.1f} | "
            f"**{r['delta_ttft_ms']:+.1f}** | {r['delta_headers_ms']:+.1f} | "
            f"{r['delta_after_headers_ms']:+.1f} | {r['ingress_ms']:.1f} | {r['admission_ms']:.1f} | "
            f"{r['replica_ms']:.1f} | {r['hop_ms']:.1f} | {r['proxy_and_rest_ms']:+.1f} |")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        of = [r for r in rows if r["mode"] == mode]
        lines.append(f"| **{mode}: median of {len(of)}** | | "
                     f"{statistics.median(r['bare_ttft_ms'] for r in of):.1f} | "
                     f"{statistics.median(r['stack_ttft_ms'] for r in of):.1f} | "
                     f"**{statistics.median(r['delta_ttft_ms'] for r in of):+.1f}** | "
                     f"{statistics.median(r['delta_headers_ms'] for r in of):+.1f} | "
                     f"{statistics.median(r['delta_after_headers_ms'] for r in of):+.1f} | "
                     "| | | | |")
    lines += ["", "All times in ms. `ingress`, `admission`, `replica`, `hop` are the stack's "
              "`Server-Timing` phases (deployments/server_timing.py); `replica` is vLLM's own "
              "preprocessing, which bare vLLM does too, so the headers difference is ingress + "
              "admission + hop + proxy & rest.", ""] + notes + ["", "![breakdown](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    _plot_summary(out, rows)


def _plot_summary(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ("ingress", "admission", "hop", "proxy_and_rest", "after_headers")
    colors = ("#dd8452", "#55a868", "#c44e52", "#937860", "#4c72b0")
    fig, ax = plt.subplots(figsize=(8, 1.8 + 0.7 * len(rows)))
    for y, r in enumerate(rows):
        left = 0.0
        values = (r["ingress_ms"], r["admission_ms"], r["hop_ms"], r["proxy_and_rest_ms"],
                  r["delta_after_headers_ms"])
        for part, color, value in zip(parts, colors, values):
            ax.barh(y, value, left=left, color=color, label=part if y == 0 else None)
            left += value
        ax.text(left, y, f"  {r['delta_ttft_ms']:+.0f} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{r['mode']}, {r['date'][5:16]}" for r in rows])
    ax.set_xlabel("stack TTFT − bare vLLM TTFT, ms (medians, concurrency 1)")
    ax.set_xlim(right=ax.get_xlim()[1] * 1.12)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5)
    ax.set_title("Where the stack's extra time to first token goes")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ttft_breakdown")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--serve-mode", choices=("default", "throughput"), default="throughput",
                        help="throughput: as `make serve` runs it (core/serve_mode.py)")
    parser.add_argument("--rewrite-report", action="store_true",
                        help="re-render report.md/.png from report.json (e.g. after editing notes)")
    args = parser.parse_args()
    if args.rewrite_report:
        write_report(args.out, json.loads((args.out / "report.json").read_text()))
        return 0

    import platform

    from benchmarks.serve_vs_vllm import start_bare_vllm
    from ruvllm.model_store import prepare_builtin

    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    model_path = prepare_builtin(MODEL)

    def one_replica(a: dict) -> None:
        a["replicas"]["num_replicas"] = 1
        a["engine"]["cpu_threads_bind"] = "auto"  # vLLM's default, as bare vLLM runs

    from ruvllm.serve_mode import CPU_FLAGS, DEFAULT_MODE_FLAGS

    flags = CPU_FLAGS if args.serve_mode == "throughput" else DEFAULT_MODE_FLAGS
    starters = {"bare": lambda: start_bare_vllm(model_path, 8100, logs / "bare.log"),
                "stack": lambda: start_stack(8300, logs / "stack.log", one_replica,
                                             env_vars=flags)}
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores",
              "requests": args.requests, "serve_mode": args.serve_mode, "targets": {}}
    for offset, name in enumerate(starters):
        ready_log = None if name == "bare" else logs / f"{name}.log"
        with running(name, starters[name], args.startup_timeout, ready_log=ready_log) as (url, _):
            rows = measure(url, args.requests, offset * 100_000)
            result["targets"][name] = {**summarize(rows), "rows": rows}
            log(f"{name}: TTFT p50 {result['targets'][name]['ttft_ms']:.1f} ms")
    write_report(args.out, result)
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
