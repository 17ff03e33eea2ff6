"""The OpenAI-compatible HTTP ingress, one concept per file (the way Ray Serve LLM splits
its ingress, middleware and router):

  routes.py           OpenAIIngress: the OpenAI routes; a request parsed once, measured,
                      charged, admitted and sent to a replica in a typed envelope
  admin.py            the adapter admin API (/v1/adapters), a mixin of OpenAIIngress
  tenants.py          API-key authentication and the tenant a request is counted under
  admission_pools.py  one admission pool per set of engines, sized from the cluster view
  relay.py            the call to the replica, its deadline, the retry after an
                      engine-dead answer, the JSON or SSE relay
  errors.py           the one error-mapping path (OpenAI-shaped errors, stream error events)
  api.py              the FastAPI app the routes hang on
"""

from ruvllm.deployments.ingress.routes import OpenAIIngress, ingress_deployment

__all__ = ["OpenAIIngress", "ingress_deployment"]
