"""Who a request is from: with API keys configured, the key's tenant (or a 401); without,
the tenant the client names itself.

The tenant is what admission control shares capacity by (weighted fair queuing,
per-tenant limits). Without keys it is fairness between cooperating clients, not
security: the tenant header, else a hash of the bearer token, else the body's `user`
(admission bounds how many names it keeps apart).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from ruvllm.deployments.auth import ApiKeys, bearer, digest
from ruvllm.deployments.client_error import ClientError


class Tenants:
    def __init__(self, api_keys: ApiKeys, tenant_header: str) -> None:
        self._api_keys = api_keys
        self._tenant_header = tenant_header

    def authenticate(self, request: Request) -> str | None:
        """With API keys on: the key's tenant, or 401. Off: None (tenant from the request)."""
        if not self._api_keys.enabled:
            return None
        tenant = self._api_keys.tenant_for(bearer(request.headers))
        if tenant is None:
            raise ClientError(401, "a valid API key is required "
                              "(Authorization: Bearer <key>)",
                              headers={"www-authenticate": "Bearer"})
        return tenant

    def named_by_client(self, request: Request, parsed: Any) -> str:
        """Without API keys, the tenant the client names."""
        header = request.headers.get(self._tenant_header)
        if header:
            return header
        key = bearer(request.headers)
        if key:  # never keep raw API keys around, even in memory-resident tables
            return "key:" + digest(key)[:16]
        return getattr(parsed, "user", None) or "anonymous"
