"""Admission control: may a request start now, must it wait, or is it turned away?

Capacity is the engines' own: their KV tokens (blocks x block size, times
`kv_fraction`) and their `max_num_seqs`, summed over live replicas and split between
ingress replicas. A request is admitted when its predicted KV footprint (prompt +
max_tokens) fits next to what is already admitted; otherwise it waits in a bounded queue.

Waiting requests are served fairly across tenants by weighted fair queuing on admitted
tokens: the tenant that has been granted the fewest tokens (divided by its weight) goes
next, so a tenant flooding the queue cannot starve a light one. Per-tenant concurrency
and token-rate limits hold a tenant back without blocking others.

Past the queue bound, past the request's wait deadline, or over its tenant's rate
budget, a request is rejected with a `Retry-After` estimate (the ingress answers 429).
A request that no wait can help (more KV tokens than the engines ever had, more than its
tenant's whole per-minute budget) is refused as `TooLarge` at once (the ingress answers
400): a retry would fail the same way.
A waiting request whose client disconnects (task cancelled) leaves the queue at once.

The tenant table is bounded (`max_tenants`): tenant names may come from clients, and
every name would otherwise stay forever and be scanned on every dispatch.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ruvllm.config import AdmissionConfig, TenantLimits


OVERFLOW_TENANT = "*overflow"


class TooLarge(Exception):
    """A request no amount of waiting can admit."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Rejected(Exception):
    def __init__(self, reason: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass
class _Waiter:
    tenant: str
    tokens: int
    seqs: int
    enqueued_at: float
    future: asyncio.Future


@dataclass
class _Tenant:
    limits: TenantLimits
    queue: deque[_Waiter] = field(default_factory=deque)
    granted_tokens: float = 0.0  # virtual time: tokens admitted / weight
    running: int = 0
    running_tokens: int = 0
    running_seqs: int = 0
    bucket: float = 0.0  # token-rate budget
    bucket_at: float = 0.0


class Admission:
    """An admitted request's hold on capacity; release exactly once when it ends."""

    def __init__(self, controller: "AdmissionController", tenant: str, tokens: int,
                 waited_s: float, seqs: int = 1) -> None:
        self._controller = controller
        self.tenant = tenant
        self.tokens = tokens
        self.seqs = seqs
        self.waited_s = waited_s
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._controller._release(self)


class AdmissionController:
    def __init__(self, config: AdmissionConfig, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[["AdmissionController"], None] | None = None) -> None:
        self._config = config
        self._clock = clock
        self._on_change = on_change or (lambda _: None)
        self._tenants: dict[str, _Tenant] = {}
        self._kv_tokens = 0
        self._max_seqs = 0
        # The most the engines have offered: a request beyond it can never be admitted,
        # one beyond today's (a replica restarting) waits for the capacity to return.
        self._peak_kv_tokens = 0
        self.inflight_tokens = 0
        self.inflight_requests = 0
        self.inflight_seqs = 0
        self.queued = 0
        # Drain rate for Retry-After: tokens released per second, smoothed.
        self._released_tokens_per_s = 0.0
        self._last_release_at = clock()

    # -- capacity ------------------------------------------------------------------------

    def tenant_demand(self) -> dict[str, tuple[int, int]]:
        """(KV tokens, sequences) each tenant has admitted or waiting here: this ingress's
        demand, from which the controller splits capacity between ingresses
        (router/capacity_shares.py)."""
        out = {}
        for name, t in self._tenants.items():
            if t.running or t.queue:
                out[name] = (t.running_tokens + sum(w.tokens for w in t.queue),
                             t.running_seqs + sum(w.seqs for w in t.queue))
        return out

    @property
    def capacity(self) -> tuple[int, int]:
        return self._kv_tokens, self._max_seqs

    def set_capacity(self, kv_tokens: int, max_seqs: int) -> None:
        self._kv_tokens = int(kv_tokens * self._config.kv_fraction)
        self._max_seqs = max_seqs
        self._peak_kv_tokens = max(self._peak_kv_tokens, self._kv_tokens)
        self._dispatch()

    def _fits(self, tokens: int, seqs: int) -> bool:
        if self.inflight_requests == 0:
            # An idle cluster takes any request the engines can hold at all (a request
            # of more sequences than one pass holds is run in turns by the engine).
            return self._max_seqs > 0 and tokens <= self._kv_tokens
        return (self.inflight_tokens + tokens <= self._kv_tokens
                and self.inflight_seqs + seqs <= self._max_seqs)

    # -- the entry point -----------------------------------------------------------------

    async def admit(self, tenant: str, tokens: int, timeout_s: float | None = None,
                    seqs: int = 1) -> Admission:
        """Wait until the request (`seqs` sequences holding `tokens` KV tokens in all)
        may start; raises Rejected (-> 429) or TooLarge (-> 400)."""
        cfg = self._config
        tenant, t = self._tenant(tenant)
        if t.limits.tokens_per_minute is not None and tokens > t.limits.tokens_per_minute:
            raise TooLarge(f"request of {tokens} predicted tokens exceeds its tenant's whole "
                           f"budget of {t.limits.tokens_per_minute} per minute")
        if self._peak_kv_tokens and tokens > self._peak_kv_tokens:
            raise TooLarge(f"request of {tokens} predicted KV tokens (prompt + max_tokens, "
                           f"times n) can never fit the engines' {self._peak_kv_tokens}; "
                           "lower max_tokens or n")
        now = self._clock()
        if not self.queued and self._admissible(t, tokens, now) and self._fits(tokens, seqs):
            return self._grant(tenant, t, tokens, seqs, 0.0)
        if self.queued >= cfg.max_queue and not self._push_out_for(tenant):
            raise Rejected("queue_full", f"server at capacity: {self.queued} requests "
                           "already waiting", self.retry_after_s())
        if not t.queue:
            # A tenant returning after idling must not bank credit from its idle time.
            t.granted_tokens = max(t.granted_tokens, self._min_active_virtual_time())
        waiter = _Waiter(tenant, tokens, seqs, now, asyncio.get_running_loop().create_future())
        t.queue.append(waiter)
        self.queued += 1
        self._dispatch()  # others may be held by their own limits while this one may go
        self._on_change(self)
        timeout = cfg.queue_timeout_s if timeout_s is None else min(timeout_s, cfg.queue_timeout_s)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except asyncio.TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return waiter.future.result()  # granted at the last moment
            raise Rejected("deadline", f"no capacity within {timeout:g} s",
                           self.retry_after_s()) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.result().release()  # granted, but the client is gone
            raise
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
            if waiter in t.queue:
                t.queue.remove(waiter)
                self.queued -= 1
                self._on_change(self)

    def retry_after_s(self) -> int:
        """Seconds until the queue ahead has likely drained, for Retry-After."""
        ahead = sum(w.tokens for t in self._tenants.values() for w in t.queue)
        rate = self._released_tokens_per_s
        if rate <= 0:
            return 2
        return max(1, min(60, math.ceil(ahead / rate)))

    # -- internals -----------------------------------------------------------------------

    def _tenant(self, name: str) -> tuple[str, _Tenant]:
        """The tenant's entry, made on first sight; past `max_tenants` entries idle ones
        are forgotten, and if none is idle an unconfigured name shares one overflow entry."""
        t = self._tenants.get(name)
        if t is not None:
            return name, t
        if name not in self._config.tenants and len(self._tenants) >= self._config.max_tenants:
            self._forget_idle_tenants()
            if len(self._tenants) >= self._config.max_tenants:
                name = OVERFLOW_TENANT
                t = self._tenants.get(name)
                if t is not None:
                    return name, t
        limits = self._config.tenants.get(name, self._config.default_tenant)
        t = _Tenant(limits, bucket=float(limits.tokens_per_minute or 0), bucket_at=self._clock())
        self._tenants[name] = t
        return name, t

    def _forget_idle_tenants(self) -> None:
        """Drop tenants with nothing queued or running and a full rate budget: all they
        still hold is fair-queuing credit, which a returning tenant is reset to anyway."""
        now = self._clock()
        for name in [n for n, t in self._tenants.items()
                     if not t.queue and not t.running and self._bucket_full(t, now)]:
            del self._tenants[name]

    @staticmethod
    def _bucket_full(t: _Tenant, now: float) -> bool:
        per_minute = t.limits.tokens_per_minute
        return per_minute is None or t.bucket + (now - t.bucket_at) * per_minute / 60 >= per_minute

    def _admissible(self, t: _Tenant, tokens: int, now: float) -> bool:
        limits = t.limits
        if limits.max_concurrent is not None and t.running >= limits.max_concurrent:
            return False
        if limits.tokens_per_minute is not None:
            per_s = limits.tokens_per_minute / 60.0
            t.bucket = min(limits.tokens_per_minute, t.bucket + (now - t.bucket_at) * per_s)
            t.bucket_at = now
            if t.bucket < tokens:
                return False
        return True

    def _grant(self, name: str, t: _Tenant, tokens: int, seqs: int,
               waited_s: float) -> Admission:
        if t.limits.tokens_per_minute is not None:
            t.bucket -= tokens
        t.running += 1
        t.running_tokens += tokens
        t.running_seqs += seqs
        t.granted_tokens += tokens / t.limits.weight
        self.inflight_tokens += tokens
        self.inflight_requests += 1
        self.inflight_seqs += seqs
        self._on_change(self)
        return Admission(self, name, tokens, waited_s, seqs)

    def _release(self, admission: Admission) -> None:
        t = self._tenants[admission.tenant]
        t.running -= 1
        t.running_tokens -= admission.tokens
        t.running_seqs -= admission.seqs
        self.inflight_tokens -= admission.tokens
        self.inflight_requests -= 1
        self.inflight_seqs -= admission.seqs
        now = self._clock()
        elapsed = max(now - self._last_release_at, 1e-3)
        instant = admission.tokens / elapsed
        self._released_tokens_per_s = 0.8 * self._released_tokens_per_s + 0.2 * instant
        self._last_release_at = now
        self._dispatch()
        self._on_change(self)

    def _push_out_for(self, tenant: str) -> bool:
        """On a full queue, make room for `tenant` by turning away the newest request of
        the tenant holding the most queue places, if that tenant holds more than it."""
        mine = len(self._tenants[tenant].queue)
        name, hog = max(self._tenants.items(), key=lambda kv: (len(kv[1].queue), kv[0]))
        if name == tenant or len(hog.queue) <= mine + 1:
            return False
        victim = hog.queue.pop()
        self.queued -= 1
        if not victim.future.done():
            victim.future.set_exception(Rejected(
                "queue_full", "server at capacity; queue place given to another tenant",
                self.retry_after_s()))
        return True

    def _min_active_virtual_time(self) -> float:
        active = [t.granted_tokens for t in self._tenants.values() if t.queue]
        return min(active, default=0.0)

    def _dispatch(self) -> None:
        """Grant waiting requests, fairest tenant first, while capacity lasts."""
        now = self._clock()
        while self.queued:
            ready = [(t.granted_tokens, t.queue[0].enqueued_at, name, t)
                     for name, t in self._tenants.items()
                     if t.queue and self._admissible(t, t.queue[0].tokens, now)]
            if not ready:
                return  # every waiting tenant is held back by its own limits
            _, _, name, t = min(ready, key=lambda x: (x[0], x[1]))
            waiter = t.queue[0]
            if not self._fits(waiter.tokens, waiter.seqs):
                return  # the fairest request waits for capacity; nobody overtakes it
            t.queue.popleft()
            self.queued -= 1
            if waiter.future.done():  # cancelled or timed out meanwhile
                continue
            waiter.future.set_result(self._grant(name, t, waiter.tokens, waiter.seqs,
                                                 now - waiter.enqueued_at))
