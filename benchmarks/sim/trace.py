"""Workload traces: one JSON object per line, one line per request.

    {"t": 12.5, "session": "s17", "turn": 1, "think_s": 8.2, "tenant": "acme",
     "adapter": "lora0042", "prompt": [["sys/lora0042", 512], ["doc/77", 2300],
     ["s17/u0", 60], ["s17/a0", 180], ["s17/u1", 40]], "output_tokens": 210,
     "max_tokens": 512, "output_segment": "s17/a1"}

- `t`: seconds from the trace's start when the request arrives. With `think_s` (and a
  `session` whose previous request is still in the trace) the request instead arrives
  `think_s` after the session's previous request ends: a closed loop, as users wait for
  an answer before they type. Replayed logs usually give `t` alone.
- `prompt`: the prompt as named segments `[id, tokens]`; two prompts that start with the
  same ids share that prefix (system prompt, document, the conversation so far), which is
  what the engines' prefix caches and the router's prefix hashes see. A log without
  segment structure can give `"prompt_tokens": N` instead (a prompt that shares nothing).
- `client`: like `session` for the closed loop (a load generator's worker), without
  telling the router a session id.
- `adapter`: LoRA adapter name or null (the base model). `tenant`: admission's tenant.
- `output_tokens`: tokens generated; `max_tokens`: what the client asked for (admission
  reserves prompt + max_tokens). `output_segment`: the answer's id, so a later turn that
  quotes it hits the cache (vLLM caches generated tokens' KV too).
"""

from __future__ import annotations

import json
import math
import random
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator


@dataclass
class TraceRequest:
    t: float
    prompt: list[tuple[str, int]]
    output_tokens: int
    max_tokens: int
    tenant: str = "default"
    adapter: str | None = None
    session: str | None = None
    client: str | None = None  # closed-loop sequencing without session identity (load tests)
    turn: int = 0
    think_s: float | None = None
    output_segment: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(n for _, n in self.prompt)

    def to_json(self) -> str:
        d = asdict(self)
        d["prompt"] = [list(s) for s in self.prompt]
        return json.dumps({k: v for k, v in d.items() if v is not None}, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str, index: int = 0) -> "TraceRequest":
        d = json.loads(line)
        if "prompt" not in d:
            if "prompt_tokens" not in d:
                raise ValueError(f"trace line {index + 1}: needs 'prompt' or 'prompt_tokens'")
            d["prompt"] = [[f"req{index}", int(d.pop("prompt_tokens"))]]
        d.pop("prompt_tokens", None)
        d["prompt"] = [(str(s), int(n)) for s, n in d["prompt"]]
        d.setdefault("max_tokens", d.get("output_tokens", 256))
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"trace line {index + 1}: {e}") from None


def write(path: Path, requests: Iterable[TraceRequest]) -> None:
    with open(path, "w") as f:
        for r in requests:
            f.write(r.to_json() + "\n")


def read(path: Path) -> list[TraceRequest]:
    with open(path) as f:
        return [TraceRequest.from_json(line, i) for i, line in enumerate(f) if line.strip()]


# -- the synthetic workload -------------------------------------------------------------

@dataclass
class WorkloadSpec:
    sessions: int = 10_000
    adapters: int = 1_000
    zipf_s: float = 1.0  # adapter popularity
    adapter_fraction: float = 0.8  # sessions on an adapter; the rest on the base model
    base_system_prompts: int = 20
    documents: int = 2_000
    document_zipf_s: float = 0.9
    document_fraction: float = 0.5  # sessions that open with a shared document
    mean_turns: float = 4.0
    max_turns: int = 12
    mean_think_s: float = 10.0
    duration_s: float = 300.0  # session starts spread over this
    diurnal_amplitude: float = 0.5  # rate x (1 + a sin(2 pi t / duration))
    burst_factor: float = 3.0  # rate x this inside a burst
    burst_fraction: float = 0.1  # share of time inside bursts
    max_tokens: int = 512
    max_context: int = 8192
    tenants: dict[str, float] = field(default_factory=lambda: {
        "gold": 0.4, "silver": 0.3, "bronze": 0.2, "free": 0.1})  # share of sessions
    seed: int = 0


def zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (k + 1) ** s for k in range(n)]


def _cumulative(weights: list[float]) -> list[float]:
    out, acc = [], 0.0
    for w in weights:
        acc += w
        out.append(acc)
    return out


def stable_hash(*parts: object) -> int:
    """A hash that is the same in every process (str hashes are salted per process)."""
    return zlib.crc32(repr(parts).encode())


def _session_starts(spec: WorkloadSpec, rng: random.Random) -> list[float]:
    """Non-homogeneous Poisson arrivals (thinning): a diurnal swing plus bursts."""
    mean_rate = spec.sessions / spec.duration_s
    bursts = []  # [start, end) windows
    t = 0.0
    burst_len = max(1.0, spec.duration_s / 20)
    while t < spec.duration_s:
        t += rng.expovariate(spec.burst_fraction / burst_len) if spec.burst_fraction > 0 else math.inf
        bursts.append((t, t + burst_len))
        t += burst_len

    def rate(x: float) -> float:
        r = 1 + spec.diurnal_amplitude * math.sin(2 * math.pi * x / spec.duration_s)
        if any(a <= x < b for a, b in bursts):
            r *= spec.burst_factor
        return r

    peak = (1 + spec.diurnal_amplitude) * spec.burst_factor
    # Normalise so the expected count is `sessions`: scale by the rate's mean.
    grid = [rate(spec.duration_s * (i + 0.5) / 2000) for i in range(2000)]
    scale = mean_rate / (sum(grid) / len(grid))
    starts, t = [], 0.0
    while len(starts) < spec.sessions:
        t += rng.expovariate(scale * peak)
        if t >= spec.duration_s:
            t = rng.uniform(0, spec.duration_s)  # top up (rare): keeps the count exact
            starts.append(t)
            continue
        if rng.random() < rate(t) / peak:
            starts.append(t)
    return sorted(starts)


def generate(spec: WorkloadSpec) -> list[TraceRequest]:
    rng = random.Random(spec.seed)
    adapter_names = [f"lora{i:04d}" for i in range(spec.adapters)]
    adapter_cw = _cumulative(zipf_weights(spec.adapters, spec.zipf_s))
    doc_cw = _cumulative(zipf_weights(spec.documents, spec.document_zipf_s))
    tenants, tenant_cw = list(spec.tenants), _cumulative(list(spec.tenants.values()))
    # Sizes are functions of the id, so every session sharing a segment agrees on it.
    sys_tokens = lambda key: 200 + stable_hash("sys", key, spec.seed) % 600
    doc_tokens = lambda d: 500 + stable_hash("doc", d, spec.seed) % 3500
    out: list[TraceRequest] = []
    for i, start in enumerate(_session_starts(spec, rng)):
        sid = f"s{i}"
        adapter = (rng.choices(adapter_names, cum_weights=adapter_cw)[0]
                   if rng.random() < spec.adapter_fraction else None)
        sys_key = adapter or f"base{rng.randrange(spec.base_system_prompts)}"
        prompt: list[tuple[str, int]] = [(f"sys/{sys_key}", sys_tokens(sys_key))]
        if rng.random() < spec.document_fraction:
            d = rng.choices(range(spec.documents), cum_weights=doc_cw)[0]
            prompt.append((f"doc/{d}", doc_tokens(d)))
        tenant = rng.choices(tenants, cum_weights=tenant_cw)[0]
        turns = min(spec.max_turns, 1 + int(rng.expovariate(1 / max(1e-9, spec.mean_turns - 1))))
        for turn in range(turns):
            prompt = prompt + [(f"{sid}/u{turn}", rng.randint(20, 200))]
            output = min(spec.max_tokens, max(8, int(rng.lognormvariate(math.log(150), 0.7))))
            if sum(n for _, n in prompt) + spec.max_tokens > spec.max_context:
                break
            out.append(TraceRequest(
                t=start, prompt=list(prompt), output_tokens=output, max_tokens=spec.max_tokens,
                tenant=tenant, adapter=adapter, session=sid, turn=turn,
                think_s=None if turn == 0 else round(rng.expovariate(1 / spec.mean_think_s), 3),
                output_segment=f"{sid}/a{turn}"))
            prompt = prompt + [(f"{sid}/a{turn}", output)]
            start += 1.0  # nominal; closed-loop turns arrive think_s after the previous ends
    out.sort(key=lambda r: r.t)
    return out


SEGMENT_KINDS = ("system prompt", "document", "conversation so far", "new message")


def segment_kind(segment: str, last: bool) -> str:
    """What a prompt segment of the synthetic workload is: its shared system prompt or
    document, the session's earlier turns, or the message the user just typed."""
    if segment.startswith("sys/"):
        return "system prompt"
    if segment.startswith("doc/"):
        return "document"
    return "new message" if last else "conversation so far"


def tokens_by_kind(prompt: list[tuple[str, int]], cached: int) -> dict[str, tuple[int, int]]:
    """(tokens, cached tokens) per segment kind: a prefix cache serves the leading
    `cached` tokens, so they are the first segments'."""
    out: dict[str, tuple[int, int]] = {}
    for i, (segment, tokens) in enumerate(prompt):
        kind = segment_kind(segment, i == len(prompt) - 1)
        hit = max(0, min(tokens, cached))
        cached -= tokens
        n, h = out.get(kind, (0, 0))
        out[kind] = (n + tokens, h + hit)
    return out


def sessions_of(requests: list[TraceRequest]) -> Iterator[list[TraceRequest]]:
    by: dict[str, list[TraceRequest]] = {}
    for k, r in enumerate(requests):
        by.setdefault(r.session or r.client or f"#{k}", []).append(r)
    for reqs in by.values():
        yield sorted(reqs, key=lambda r: r.turn)
