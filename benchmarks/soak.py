"""Soak and overload: many concurrent client sessions against the stack for a long time,
a mix of good, abusive and disconnecting clients, with the ingress's and the engine
replicas' memory sampled throughout.

    python -m benchmarks.soak --sessions 200 --duration 600 --out benchmarks/results/soak

Sessions (each loops until the end, one request at a time):

  good          streamed and plain chat requests of 16 tokens: must never see a 5xx, never
                hang past --request-timeout; a 429 (admission) must carry Retry-After;
  abusive       requests the server must refuse at once (n beyond the limit, max_tokens
                beyond the context, malformed JSON, a 70-deep body, 20 stop strings),
                and a flood of good requests from one tenant without pause;
  disconnecting streams closed after the first chunk.

The ingress and replica processes (Ray names them `ray::ServeReplica:<app>:<deployment>`)
and their vLLM engine cores are sampled every --sample-s; the report gives RSS growth
over the last half of the run (the target: flat, at most +5 %).
Writes report.json, report.md and report.png under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from benchmarks.harness import MODEL, log, running, start_stack

KINDS = ("good", "abusive", "disconnecting")


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    hung: int = 0  # past the request timeout
    no_retry_after: int = 0  # 429s without Retry-After
    latencies: list[float] = field(default_factory=list)


def abusive_request(rng: random.Random) -> tuple[dict | bytes, dict[str, str]]:
    messages = [{"role": "user", "content": "hi"}]
    pick = rng.randrange(6)
    if pick == 0:
        return {"model": MODEL, "messages": messages, "n": 10_000}, {}
    if pick == 1:
        return {"model": MODEL, "messages": messages, "max_tokens": 10**9}, {}
    if pick == 2:
        return b'{"model": "' + MODEL.encode() + b'", "messages": [', {}
    if pick == 3:
        nested: object = "x"
        for _ in range(70):
            nested = [nested]
        return {"model": MODEL, "messages": messages, "extra": nested}, {}
    if pick == 4:
        return {"model": MODEL, "messages": messages, "stop": ["s"] * 20}, {}
    # A flood from one tenant: valid, sent without pause; admission turns it away.
    return ({"model": MODEL, "messages": messages, "max_tokens": 16},
            {"x-tenant-id": "flood"})


async def one_request(client: httpx.AsyncClient, url: str, kind: str, rng: random.Random,
                      tally: Tally, timeout_s: float) -> None:
    started = time.monotonic()
    headers: dict[str, str] = {}
    if kind == "abusive":
        body, headers = abusive_request(rng)
    else:
        body = {"model": MODEL, "max_tokens": 16, "stream": kind == "disconnecting"
                or rng.random() < 0.5,
                "messages": [{"role": "user", "content": f"Tell me about {rng.random()}"}]}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers["content-type"] = "application/json"
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", url, content=content, headers=headers) as r:
                if r.status_code == 429 and "retry-after" not in r.headers:
                    tally.no_retry_after += 1
                status = r.status_code
                async for line in r.aiter_lines():
                    if kind == "disconnecting" and line.startswith("data: "):
                        break  # leave mid-stream: the engine must abort it
                    if line.startswith("data: {\"error\""):
                        status = int(json.loads(line[6:])["error"].get("code", 500))
                tally.statuses[status] += 1
    except TimeoutError:
        tally.hung += 1
    except httpx.HTTPError as e:
        tally.statuses[f"client:{type(e).__name__}"] += 1
    tally.latencies.append(time.monotonic() - started)


async def session(url: str, kind: str, seed: int, until: float, tally: Tally,
                  timeout_s: float) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=None) as client:
        while time.monotonic() < until:
            await one_request(client, url, kind, rng, tally, timeout_s)
            # Good clients think between turns; the others come straight back (a short
            # pause only, so that on 2 cores the load generator does not starve the app).
            await asyncio.sleep(rng.uniform(0, 1) if kind == "good" else 0.05)


def serve_processes() -> dict[str, list[psutil.Process]]:
    """ingress / replicas (with their engine cores) by their Ray process titles."""
    groups: dict[str, list[psutil.Process]] = defaultdict(list)
    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if "ServeReplica:" not in title:
            continue
        if "OpenAIIngress" in title:
            groups["ingress"].append(p)
        elif ":LLMReplica" in title:
            groups["replicas"].append(p)
            groups["replicas"] += p.children(recursive=True)
    return groups


def rss_mib(processes: list[psutil.Process]) -> float:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


async def sample(until: float, every_s: float, series: dict[str, list]) -> None:
    started = time.monotonic()
    while time.monotonic() < until:
        groups = serve_processes()
        series["t"].append(time.monotonic() - started)
        for name in ("ingress", "replicas"):
            series[name].append(rss_mib(groups.get(name, [])))
        await asyncio.sleep(every_s)


def growth_first_half(values: list[float]) -> float:
    """Warm-up: the engines touch their KV cache and allocator pools as load arrives."""
    half = values[:len(values) // 2 + 1]
    return (half[-1] - half[0]) / half[0] * 100 if half and half[0] else float("nan")


def growth_last_half(values: list[float]) -> float:
    half = values[len(values) // 2:]
    return (max(half) - half[0]) / half[0] * 100 if half and half[0] else float("nan")


async def soak(base_url: str, args: argparse.Namespace) -> dict:
    url = f"{base_url}/v1/chat/completions"
    until = time.monotonic() + args.duration
    mix = {"good": 0.7, "abusive": 0.15, "disconnecting": 0.15}
    counts = {k: round(args.sessions * share) for k, share in mix.items()}
    counts["good"] += args.sessions - sum(counts.values())
    tallies = {k: Tally() for k in KINDS}
    series: dict[str, list] = defaultdict(list)
    tasks = [session(url, kind, i, until, tallies[kind], args.request_timeout)
             for i, kind in enumerate(k for k, n in counts.items() for _ in range(n))]
    await asyncio.gather(sample(until, args.sample_s, series), *tasks)
    return {
        "sessions": counts, "duration_s": args.duration,
        "by_kind": {k: {"requests": sum(t.statuses.values()) + t.hung,
                        "statuses": {str(s): n for s, n in sorted(t.statuses.items(),
                                                                  key=str)},
                        "hung": t.hung, "429_without_retry_after": t.no_retry_after}
                    for k, t in tallies.items()},
        "good_5xx": sum(n for s, n in tallies["good"].statuses.items()
                        if isinstance(s, int) and s >= 500),
        # Over every client, the valid requests of abusive and disconnecting ones too.
        "any_5xx": sum(n for t in tallies.values() for s, n in t.statuses.items()
                       if isinstance(s, int) and s >= 500),
        "rss_mib": dict(series),
        "rss_growth_last_half_pct": {name: growth_last_half(series[name])
                                     for name in ("ingress", "replicas")},
        "rss_growth_first_half_pct": {name: growth_first_half(series[name])
                                      for name in ("ingress", "replicas")},
    }


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Soak: {sum(result['sessions'].values())} sessions for "
             f"{result['duration_s']:.0f} s", ""]
    if result.get("setup"):
        lines += [result["setup"], ""]
    lines += [f"Sessions: {result['sessions']}.", "",
             "| clients | requests | statuses | hung | 429 without Retry-After |",
             "|---|---|---|---|---|"]
    for kind, row in result["by_kind"].items():
        lines.append(f"| {kind} | {row['requests']} | {row['statuses']} | {row['hung']} | "
                     f"{row['429_without_retry_after']} |")
    growth = result["rss_growth_last_half_pct"]
    lines += ["", f"5xx on good requests: {result['good_5xx']}; on any request: "
              f"{result['any_5xx']}.", "",
              f"RSS growth over the last half: ingress {growth['ingress']:+.1f} %, "
              f"replicas (with engine cores) {growth['replicas']:+.1f} %"
              + (" (first half, warm-up: ingress {ingress:+.1f} %, replicas {replicas:+.1f} %)"
                 .format(**result["rss_growth_first_half_pct"])
                 if "rss_growth_first_half_pct" in result else "") + ".", "",
              "![RSS over time](report.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in ("ingress", "replicas"):
        ax.plot(result["rss_mib"]["t"], result["rss_mib"][name], label=name)
    ax.set_xlabel("s since start")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Soak: memory of the ingress and the engine replicas")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--sample-s", type=float, default=5)
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--url", help="an app already running (else one is started)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"))
    args = parser.parse_args()
    if args.url:
        result = asyncio.run(soak(args.url, args))
    else:
        def overrides(app: dict) -> None:
            app["engine"] = {**app["engine"], "enforce_eager": True}

        logfile = args.out / "stack.log"
        args.out.mkdir(parents=True, exist_ok=True)
        with running("stack", lambda: start_stack(args.port, logfile, overrides), 900,
                     served_model=MODEL) as (url, ready_s):
            log(f"stack ready in {ready_s:.0f} s; soaking {args.sessions} sessions for "
                f"{args.duration:.0f} s")
            result = asyncio.run(soak(url, args))
            result["setup"] = (
                f"Run {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on "
                f"{psutil.cpu_count()} CPU cores: cluster.yaml's app (2 vLLM-CPU engine "
                f"replicas of {MODEL}, eager, admission on), one ingress; the load "
                "generator on the same cores. Statuses are the HTTP status, or an SSE "
                "error event's code.")
    write_report(result, args.out)
    log(f"good 5xx: {result['good_5xx']}, hung: "
        f"{sum(r['hung'] for r in result['by_kind'].values())}, RSS growth "
        f"{result['rss_growth_last_half_pct']}")


if __name__ == "__main__":
    main()
