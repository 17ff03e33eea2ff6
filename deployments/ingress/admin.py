"""The adapter admin API (`/v1/adapters`): list who holds what, register, delete.

Operators only: every route wants the admin token (auth.AdminGuard; without one
configured the API is off, 403), and the registry itself is the placement controller's.
A mixin of `OpenAIIngress` (routes.py), which provides the state it reads; its routes
hang on the same FastAPI app, and `serve.ingress` binds inherited routes too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse

from ruvllm.adapters.registry import AdapterError
from ruvllm.deployments import request_limits
from ruvllm.deployments.client_error import ClientError
from ruvllm.deployments.ingress.api import api

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from ruvllm.deployments.auth import AdminGuard
    from ruvllm.deployments.cluster_view import ClusterView


class AdapterAdminRoutes:
    # Set by OpenAIIngress.__init__.
    _admin: "AdminGuard"
    _controller: "DeploymentHandle"
    _cluster: "ClusterView"
    _base_name: str
    _max_body_bytes: int

    @api.get("/v1/adapters")
    async def list_adapters(self, request: Request) -> JSONResponse:
        self._admin.check(request.headers)
        return JSONResponse(await self._controller.describe.remote())

    @api.post("/v1/adapters")
    async def register_adapter(self, request: Request) -> JSONResponse:
        self._admin.check(request.headers, json_body=True)
        body = await request_limits.read_json_object(request, self._max_body_bytes)
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not isinstance(path, str):
            raise ClientError(400, "body must be {\"name\": str, \"path\": str}")
        result = await self._controller.register_adapter.remote(name, path)
        if isinstance(result, AdapterError):
            raise ClientError(result.status, result.message)
        self._cluster.add_adapter(result)
        return JSONResponse({"name": result.name, "path": result.path, "rank": result.rank,
                             "target_modules": list(result.target_modules),
                             "parent": self._base_name}, status_code=201)

    @api.delete("/v1/adapters/{name}")
    async def unregister_adapter(self, name: str, request: Request) -> JSONResponse:
        self._admin.check(request.headers)
        result = await self._controller.unregister_adapter.remote(name)
        if isinstance(result, AdapterError):
            raise ClientError(result.status, result.message)
        self._cluster.drop_adapter(name)
        return JSONResponse({"name": name, "deleted": True})
