"""A vLLM engine in simulated time: continuous batching with chunked prefill, a
prefix cache, the KV and `max_num_seqs` limits, `max_loras` distinct adapters per batch,
and adapter loads that stall the engine.

Events happen only when something changes (a request arrives, a prefill or a sequence
finishes), never per decode step: between events every step takes the same time
(`EngineProfile.step_s` of the batch then running), so decode progress is a step counter
that advances at 1 / step time, and each sequence finishes when the counter reaches its
target. That keeps a 256-replica cluster at a few events per request. The step time is
refreshed at every event; the context growth in between is ignored (a sequence's context
grows by 1 token per step, a few hundred tokens between events).

The prefix cache keeps whole segments of prompts (see trace.py) keyed by everything
before them, least recently used out first, in the KV blocks that running sequences'
outputs do not hold; a hit counts whole blocks only, and never the last prompt token
(vLLM recomputes it), as vLLM's own counters do.

With `EngineProfile.step_aligned_prefill` (the CPU profile) prefill follows vLLM's
scheduler as measured on vLLM-CPU (cpu_engine/report.md, `--arrivals`): a request that
arrives while a step runs waits for that step to end; the next step carries every waiting
prompt (up to the token budget) beside the decoding batch, and their first tokens come
together at its end. Steps then run whole: the batch and the step time are fixed when a
step begins. Without it (the H200 profile) prefill is fluid: a new prompt joins the
running step at once and prompts finish one after another at the prefill rate.

Engines given a `CorePool` (the 2-core CPU profile) share a machine's cores with the
serving stack (cores.py): their step is the profile's time over the share of its core
the engine gets, re-timed whenever another engine on the pool changes its load.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from benchmarks.sim.calibration import EngineProfile
from benchmarks.sim.cores import CorePool

_EPS = 1e-6


@dataclass(eq=False)
class Sequence:
    chain: list[tuple[int, int]]  # (prefix-chain key, tokens) per prompt segment
    prompt_tokens: int
    output_tokens: int
    adapter: str | None
    first_token: asyncio.Future
    done: asyncio.Future
    output_key: int | None = None  # the answer's chain key, cached when it finishes
    remaining_prefill: float = 0.0
    cached_tokens: int = 0
    start_steps: float = 0.0
    target_steps: float = 0.0


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_usage: float
    kv_capacity_tokens: int
    max_num_seqs: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class SimEngine:
    def __init__(self, profile: EngineProfile, loop: asyncio.AbstractEventLoop,
                 cores: CorePool | None = None) -> None:
        self.p = profile
        self._loop = loop
        self._waiting: deque[Sequence] = deque()
        self._prefilling: deque[Sequence] = deque()
        self._decoding: list[tuple[float, int, Sequence]] = []
        self._active_adapters: Counter[str] = Counter()
        self._steps = 0.0
        self._sum_prompt = 0  # of decoding sequences: context = prompt + steps since start
        self._sum_start = 0.0
        self._last = loop.time()
        self._paused_until = -math.inf
        self._step_s = math.inf
        self._compute_s = math.inf  # the step on a core of its own (the profile's time)
        self._cores = cores
        if cores is not None:
            cores.join(self)
        self._chunk = 0.0
        self._aligned = profile.step_aligned_prefill
        self._prefill_step: list[Sequence] = []  # prompts in the running step (aligned)
        self._step_end: float | None = None  # step counter at its end (aligned)
        self._stall_at_step_end = 0.0  # adapter calls waiting for the running step
        self._timer: asyncio.TimerHandle | None = None
        self._kv_reserved = 0
        self._out_reserved = 0
        self._cache: OrderedDict[int, int] = OrderedDict()
        self._cache_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.evicted_tokens = 0  # cached prefix tokens dropped for room (LRU)
        self._seq_no = 0
        self.busy_s = 0.0

    # -- the API the replica uses ----------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        self._advance()
        self._waiting.append(seq)
        self._schedule()

    def stall(self, seconds: float) -> float:
        """The engine does nothing else for `seconds` of its core (an adapter load);
        returns how long that takes with the core's current share."""
        self._advance()
        if self._cores is not None:
            seconds /= self._cores.speed()
        self._paused_until = max(self._loop.time(), self._paused_until) + seconds
        self._schedule()
        return seconds

    def call_between_steps(self, seconds: float) -> float:
        """An adapter load or unload the engine takes between two steps (with
        `EngineProfile.adapter_calls_between_steps`): it waits for the running step to
        end, then stalls the engine `seconds`; returns how long the caller waits."""
        self._advance()
        if not (self._aligned and self.p.adapter_calls_between_steps) or self._step_end is None:
            return self.stall(seconds)
        speed = self._cores.speed() if self._cores is not None else 1.0
        until_end = (max(self._loop.time(), self._paused_until) - self._loop.time()
                     + (self._step_end - self._steps) * self._step_s)
        self._stall_at_step_end += seconds / speed
        return until_end + self._stall_at_step_end

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self.running, waiting=len(self._waiting),
            kv_usage=self._kv_reserved / self.p.kv_tokens, kv_capacity_tokens=self.p.kv_tokens,
            max_num_seqs=self.p.max_num_seqs, prefix_cache_queries=self.prefix_queries,
            prefix_cache_hits=self.prefix_hits)

    def busy_now(self) -> float:
        """Seconds spent stepping so far (adapter-load stalls not counted)."""
        self._advance()
        self._schedule()
        return self.busy_s

    def adapters_in_flight(self) -> set[str]:
        """Adapters running or waiting (vLLM's `lora_requests_info` metric)."""
        return set(self._active_adapters) | {s.adapter for s in self._waiting if s.adapter}

    @property
    def running(self) -> int:
        return len(self._prefilling) + len(self._decoding) + len(self._prefill_step)

    # -- time ------------------------------------------------------------------------------

    def _advance(self) -> None:
        now = self._loop.time()
        start = max(self._last, self._paused_until)
        self._last = now
        if now <= start or self._step_s == math.inf:
            return
        steps = (now - start) / self._step_s
        self.busy_s += now - start
        if self._aligned:
            if self._step_end is not None:
                self._steps = min(self._step_end, self._steps + steps)
            return
        if self._decoding:
            self._steps += steps
        if self._prefilling:
            self._prefilling[0].remaining_prefill -= steps * self._chunk

    def _on_timer(self) -> None:
        self._timer = None
        self._advance()
        self._schedule()

    def _schedule(self) -> None:
        if self._aligned:
            self._schedule_aligned()
            return
        self._finish_ready()
        self._admit()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        b = len(self._decoding)
        if not b and not self._prefilling:
            self._step_s = self._compute_s = math.inf
            if self._cores is not None:
                self._cores.changed(self)
            return
        pending = sum(s.remaining_prefill for s in self._prefilling)
        self._chunk = min(max(1.0, self.p.max_num_batched_tokens - b), pending) if pending else 0.0
        ctx = self._sum_prompt + b * self._steps - self._sum_start
        self._compute_s = self._step_s = self.p.step_s(b, int(ctx), int(self._chunk))
        if self._cores is not None:
            self._step_s = self._compute_s / self._cores.changed(self)
        self._set_timer()

    def core_load(self) -> tuple[float, float] | None:
        """(compute_s, overhead_s) of the step running now, None when idle (for CorePool;
        an adapter-load stall counts as its batch's step, or as idle without one)."""
        if self._compute_s == math.inf:
            return None
        return self._compute_s, self._cores.model.overhead_s(self.running)

    def retime(self) -> None:
        """The core's share changed (another engine's load did): finish the time run at
        the old step time, then step at the new one."""
        self._advance()
        if self._compute_s == math.inf:
            return
        self._step_s = self._compute_s / self._cores.speed()
        self._set_timer()

    def _schedule_aligned(self) -> None:
        if self._step_end is not None and self._steps >= self._step_end - _EPS:
            self._steps = self._step_end
            self._step_end = None
            self._end_step()
            if self._stall_at_step_end:
                self._paused_until = self._loop.time() + self._stall_at_step_end
                self._stall_at_step_end = 0.0
        self._admit()
        if self._step_end is not None:
            self._set_timer()  # a step is running: newcomers wait for its end
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._decoding and not self._prefilling:
            self._step_s = self._compute_s = math.inf
            if self._cores is not None:
                self._cores.changed(self)
            return
        self._begin_step()

    def _end_step(self) -> None:
        done, self._prefill_step = self._prefill_step, []
        cut = [s for s in done if s.remaining_prefill > _EPS]  # chunked: on next step
        finished = [s for s in done if s.remaining_prefill <= _EPS]
        self._prefilling.extendleft(reversed(cut + finished))
        self._finish_ready()  # the finished prompts' first tokens; the decoders done

    def _begin_step(self) -> None:
        """One whole step: the decoding batch plus every waiting prompt the token budget
        takes (vLLM's chunked prefill: the last one may be cut), timed at its start."""
        b = len(self._decoding)
        budget = max(1.0, self.p.max_num_batched_tokens - b)
        tokens = 0.0
        while self._prefilling and tokens < budget:
            seq = self._prefilling.popleft()
            take = min(seq.remaining_prefill, budget - tokens)
            seq.remaining_prefill -= take
            tokens += take
            self._prefill_step.append(seq)
        ctx = self._sum_prompt + b * self._steps - self._sum_start
        self._compute_s = self._step_s = self.p.step_s(b, int(ctx), int(tokens))
        if self._cores is not None:
            self._step_s = self._compute_s / self._cores.changed(self)
        self._step_end = self._steps + 1
        self._set_timer()

    def _set_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._aligned:
            begin = max(self._loop.time(), self._paused_until)
            wait = (self._step_end - self._steps) * self._step_s
            self._timer = self._loop.call_at(begin + max(0.0, wait), self._on_timer)
            return
        wait = math.inf
        if self._decoding:
            wait = (self._decoding[0][0] - self._steps) * self._step_s
        if self._prefilling and self._chunk > 0:
            wait = min(wait, self._prefilling[0].remaining_prefill / self._chunk * self._step_s)
        begin = max(self._loop.time(), self._paused_until)
        self._timer = self._loop.call_at(begin + max(0.0, wait), self._on_timer)

    # -- scheduling ------------------------------------------------------------------------

    def _finish_ready(self) -> None:
        while self._prefilling and self._prefilling[0].remaining_prefill <= _EPS:
            seq = self._prefilling.popleft()
            seq.first_token.set_result(self._loop.time())
            if seq.output_tokens <= 1:
                self._release(seq)
                continue
            seq.start_steps = self._steps
            seq.target_steps = self._steps + seq.output_tokens - 1
            self._sum_prompt += seq.prompt_tokens
            self._sum_start += seq.start_steps
            self._seq_no += 1
            heapq.heappush(self._decoding, (seq.target_steps, self._seq_no, seq))
        while self._decoding and self._decoding[0][0] <= self._steps + _EPS:
            _, _, seq = heapq.heappop(self._decoding)
            self._sum_prompt -= seq.prompt_tokens
            self._sum_start -= seq.start_steps
            if seq.output_key is not None:
                self._cache_put(seq.output_key, seq.output_tokens)
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self._kv_reserved -= seq.prompt_tokens + seq.output_tokens
        self._out_reserved -= seq.output_tokens
        if seq.adapter is not None:
            self._active_adapters[seq.adapter] -= 1
            if self._active_adapters[seq.adapter] <= 0:
                del self._active_adapters[seq.adapter]
        seq.done.set_result(self._loop.time())

    def _admit(self) -> None:
        skipped: list[Sequence] = []
        while self._waiting and self.running < self.p.max_num_seqs:
            seq = self._waiting[0]
            need = seq.prompt_tokens + seq.output_tokens
            if self._kv_reserved + need > self.p.kv_tokens and self.running:
                break  # first come, first served for memory (vLLM does not reorder)
            self._waiting.popleft()
            if (seq.adapter is not None and seq.adapter not in self._active_adapters
                    and len(self._active_adapters) >= self.p.max_loras):
                skipped.append(seq)  # vLLM skips it this step and schedules the next one
                continue
            self._start(seq)
        self._waiting.extendleft(reversed(skipped))

    def _start(self, seq: Sequence) -> None:
        hit = self._cache_lookup(seq.chain)
        block = self.p.block_size
        hit = min(hit // block * block, (seq.prompt_tokens - 1) // block * block)
        self.prefix_queries += seq.prompt_tokens
        self.prefix_hits += hit
        seq.cached_tokens = hit
        seq.remaining_prefill = float(seq.prompt_tokens - hit)
        self._kv_reserved += seq.prompt_tokens + seq.output_tokens
        self._out_reserved += seq.output_tokens
        if seq.adapter is not None:
            self._active_adapters[seq.adapter] += 1
        for key, tokens in seq.chain:
            self._cache_put(key, tokens)
        self._prefilling.append(seq)

    # -- prefix cache ----------------------------------------------------------------------

    def _cache_lookup(self, chain: list[tuple[int, int]]) -> int:
        hit = 0
        for key, tokens in chain:
            if key not in self._cache:
                break
            self._cache.move_to_end(key)
            hit += tokens
        return hit

    def _cache_put(self, key: int, tokens: int) -> None:
        if key in self._cache:
            self._cache.move_to_end(key)
            return
        self._cache[key] = tokens
        self._cache_tokens += tokens
        room = max(0, self.p.kv_tokens - self._out_reserved)
        while self._cache_tokens > room and self._cache:
            _, t = self._cache.popitem(last=False)
            self._cache_tokens -= t
            self.evicted_tokens += t


def chain_keys(prompt: list[tuple[str, int]], stable_hash: Any) -> list[tuple[int, int]]:
    """(key, tokens) per segment; a segment's key names every segment up to it."""
    out, key = [], 0
    for seg, tokens in prompt:
        key = stable_hash(key, seg)
        out.append((key, tokens))
    return out
