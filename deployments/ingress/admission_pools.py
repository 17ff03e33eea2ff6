"""The ingress's admission pools: one per set of engines, sized from the cluster view.

The base replicas (base model and LoRA adapters) and each dedicated model's own replicas
(X-LoRA mixtures, quantized variants) get a pool each, so a burst on one never borrows
capacity the other's engines would have to provide. Each pool's capacity is this
ingress's share of its engines' KV tokens and sequences: the controller's share, which
follows the tenants this ingress serves (so fair queuing here adds up to weighted shares
cluster-wide), or an equal split until it has answered. The queuing itself is
admission/controller.py's.
"""

from __future__ import annotations

from typing import Iterable

from ruvllm.admission.controller import Admission, AdmissionController, Rejected, TooLarge
from ruvllm.config import AdmissionConfig
from ruvllm.deployments.client_error import ClientError
from ruvllm.router.hints import RoutingHints
from ruvllm.router.metrics import AdmissionMetrics


class AdmissionPools:
    def __init__(self, config: AdmissionConfig, dedicated: Iterable[str],
                 ingress_replicas: int) -> None:
        self._enabled = config.enabled
        self._metrics = AdmissionMetrics()
        self._base = AdmissionController(config, on_change=self._changed)
        self._dedicated = {name: AdmissionController(config, on_change=self._changed)
                           for name in dedicated}
        self._all = (self._base, *self._dedicated.values())
        self._ingress_share = max(1, ingress_replicas)
        # KV tokens the engines of each set offer (None: the base replicas), for /health.
        self.capacity: dict[str | None, int] = {}

    def set_capacity(self, model: str | None, kv: int, seqs: int, share: float | None) -> None:
        """The engines of `model` (None: the base replicas) offer `kv` tokens and `seqs`
        sequences; `share` is this ingress's part (None: not known yet)."""
        self.capacity[model] = kv
        pool = self._base if model is None else self._dedicated.get(model)
        if pool is None:
            return
        if share is None:
            pool.set_capacity(kv // self._ingress_share,
                              max(1, seqs // self._ingress_share) if seqs else 0)
        else:
            pool.set_capacity(int(kv * share), max(1, int(seqs * share)) if seqs else 0)

    def tenant_demand(self) -> dict[str, tuple[int, int]]:
        """One share for all of this ingress's pools, from their demand summed."""
        out: dict[str, tuple[int, int]] = {}
        for pool in self._all:
            for tenant, (tokens, seqs) in pool.tenant_demand().items():
                had = out.get(tenant, (0, 0))
                out[tenant] = (had[0] + tokens, had[1] + seqs)
        return out

    async def admit(self, hints: RoutingHints) -> Admission:
        """Admitted (release it when the request ends), or a 429 / 400 ClientError."""
        if not self._enabled:
            return _UNLIMITED
        pool = self._dedicated.get(hints.model, self._base)
        try:
            admission = await pool.admit(hints.tenant or "anonymous", hints.predicted_tokens,
                                         seqs=hints.sequences)
        except TooLarge as e:  # no wait can help: not a 429 to retry
            self._metrics.rejected.inc(tags={"reason": "too_large"})
            raise ClientError(400, e.message, "max_tokens") from None
        except Rejected as r:
            self._metrics.rejected.inc(tags={"reason": r.reason})
            raise ClientError(429, r.message, headers={"retry-after": str(r.retry_after_s)}) from None
        self._metrics.admitted.inc()
        self._metrics.queue_wait_seconds.observe(admission.waited_s)
        return admission

    def _changed(self, _: AdmissionController) -> None:
        # Pools change only once requests arrive, after __init__ has built all of them.
        pools = self._all
        self._metrics.queued.set(sum(p.queued for p in pools))
        self._metrics.inflight_tokens.set(sum(p.inflight_tokens for p in pools))


class _Unlimited(Admission):
    def __init__(self) -> None:
        self.tenant, self.tokens, self.seqs, self.waited_s = "", 0, 0, 0.0

    def release(self) -> None:
        pass


_UNLIMITED = _Unlimited()
