"""Bursts of concurrent calls through real Ray Serve to a 2-replica deployment routed by
PlacementAwareRouter; prints how each burst split over the replicas, as JSON.

Run as its own process on its own local Ray (tests/e2e/test_routing.py): the router's
bookkeeping between decisions is Serve's to drive, and only a real Serve shows when it
runs callbacks. The replicas do nothing but wait, so the split is the router's alone.
The driver's handle calls the routed deployment directly, so it is the app's ingress:
Serve refuses a custom router there when HAProxy fronts the ingress, as `make` runs
Serve, so run it with RAY_SERVE_ENABLE_HA_PROXY=0 (it serves no HTTP)."""

from __future__ import annotations

import asyncio
import collections
import json
import sys

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from ruvllm.router.hints import RoutingHints


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64,
                  request_router_config=RequestRouterConfig(
                      request_router_class="ruvllm.router.placement_router:PlacementAwareRouter",
                      request_routing_stats_period_s=1))
class Waiter:
    def __init__(self) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def __call__(self, i: int, hints: RoutingHints | None = None) -> str:
        await asyncio.sleep(0.3)
        return self.replica


async def splits(bursts: int, size: int) -> list[list[int]]:
    handle = serve.run(Waiter.bind(), name="burst", route_prefix=None)
    hints = RoutingHints(prompt_tokens=30, max_tokens=48)
    # Both replicas seen once: Serve's queue-length cache then answers without a probe,
    # so one routing task drains a whole burst without yielding, as under steady load.
    await asyncio.gather(*(handle.remote(i, hints=hints) for i in range(4)))
    out = []
    for _ in range(bursts):
        served = await asyncio.gather(*(handle.remote(i, hints=hints) for i in range(size)))
        out.append(sorted(collections.Counter(served).values()))
        await asyncio.sleep(0.5)  # each burst from an idle start
    return out


if __name__ == "__main__":
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"location": "NoServer"})
    try:
        print("SPLITS", json.dumps(asyncio.run(splits(int(sys.argv[1]), int(sys.argv[2])))))
    finally:
        serve.shutdown()
        ray.shutdown()
