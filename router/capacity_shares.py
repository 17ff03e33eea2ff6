"""Each ingress replica's share of the engines' capacity, from the tenants it is serving.

Every ingress runs its own admission controller, and weighted fair queuing inside one
ingress only divides what that ingress was given. With an equal static split, a tenant
whose requests all reach one ingress (one client, keep-alive connections) gets that
ingress's 1/N whatever its weight: the cluster simulator measured tenant shares 24.5% off
their weights at 8 ingresses (weights 4/2/1/1, 2x overload, benchmarks/results/sim).

Here the placement controller, which every ingress already syncs with each period, hears
each ingress's demand per tenant (KV tokens and sequences admitted or waiting) and
answers with a share: each tenant's fair part of the cluster (weighted max-min:
weight-proportional, never more than it asks for, what it leaves redistributed to the
others) is split between ingresses in proportion to where that tenant's demand is;
capacity no tenant asks for is split equally. A tenant's demand is its dominant one,
tokens or sequences, as a fraction of the engines' total: on the H200 profile
`max_num_seqs` binds long before KV tokens do, and a token-only demand there read an
overloaded cluster as idle (simulated: 25% share error, no better than the static split). An ingress never drops below `floor` of an equal share, so a first request
there still starts before the next sync. Weighted fair queuing in each ingress then adds up
to weighted shares cluster-wide (simulated: within 1.5% at 4-16 ingresses).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class _IngressDemand:
    demand: dict[str, tuple[float, float]]  # tenant -> (KV tokens, sequences) here
    seen_at: float


def fair_allocation(demand: dict[str, float], weight: dict[str, float],
                    capacity: float) -> dict[str, float]:
    """Weighted max-min fair split of `capacity`: every tenant gets capacity in proportion
    to its weight, capped at its demand; what capped tenants leave goes to the rest."""
    alloc = {t: 0.0 for t in demand}
    open_ = {t for t, d in demand.items() if d > 0}
    left = capacity
    while open_ and left > 1e-9:
        wsum = sum(weight[t] for t in open_)
        per_weight = left / wsum
        capped = {t for t in open_ if demand[t] - alloc[t] <= per_weight * weight[t]}
        if not capped:
            for t in open_:
                alloc[t] += per_weight * weight[t]
            break
        for t in capped:
            left -= demand[t] - alloc[t]
            alloc[t] = demand[t]
        open_ -= capped
    return alloc


class CapacityShares:
    def __init__(self, weight_of: Callable[[str], float], timeout_s: float,
                 floor: float = 0.05, clock: Callable[[], float] = time.monotonic) -> None:
        """`weight_of(tenant)`: the tenant's admission weight. `timeout_s`: an ingress that
        has not synced for this long no longer holds a share."""
        self._weight_of = weight_of
        self._timeout_s = timeout_s
        self._floor = floor
        self._clock = clock
        self._ingresses: dict[str, _IngressDemand] = {}

    def update(self, ingress_id: str, tenant_demand: dict[str, tuple[float, float]]) -> None:
        """`tenant_demand`: tenant -> (KV tokens, sequences) admitted or waiting there."""
        self._ingresses[ingress_id] = _IngressDemand(
            {t: (float(tokens), float(seqs)) for t, (tokens, seqs) in tenant_demand.items()
             if tokens > 0 or seqs > 0}, self._clock())

    def share(self, ingress_id: str, kv_tokens: float, max_seqs: float) -> float:
        """The fraction of the engines' capacity this ingress should admit against."""
        return self.shares(kv_tokens, max_seqs).get(ingress_id, 0.0)

    def shares(self, kv_tokens: float, max_seqs: float) -> dict[str, float]:
        self._expire()
        n = len(self._ingresses)
        if n == 0:
            return {}
        kv, seqs = max(kv_tokens, 1.0), max(max_seqs, 1.0)
        # Each tenant's demand at each ingress as a fraction of the whole cluster.
        local = {iid: {t: max(tokens / kv, s / seqs) for t, (tokens, s) in d.demand.items()}
                 for iid, d in self._ingresses.items()}
        totals: dict[str, float] = {}
        for demand in local.values():
            for t, x in demand.items():
                totals[t] = totals.get(t, 0.0) + x
        alloc = fair_allocation(totals, {t: self._weight_of(t) for t in totals}, 1.0)
        unclaimed = max(0.0, 1.0 - sum(alloc.values()))
        raw = {iid: unclaimed / n + sum(alloc[t] * x / totals[t] for t, x in demand.items())
               for iid, demand in local.items()}
        total = sum(raw.values())
        floor = self._floor / n
        out = {iid: max(floor, r / total) for iid, r in raw.items()}
        scale = sum(out.values())
        return {iid: s / scale for iid, s in out.items()}

    def _expire(self) -> None:
        now = self._clock()
        for iid in [i for i, d in self._ingresses.items() if now - d.seen_at > self._timeout_s]:
            del self._ingresses[iid]
