"""The ingress's FastAPI app. Its routes are methods of `OpenAIIngress` (routes.py) and
of the admin mixin it inherits (admin.py), bound to the Serve replica by
`serve.ingress(api)`; its errors are mapped by errors.py."""

from __future__ import annotations

from fastapi import FastAPI

from ruvllm.deployments.client_gone import ClientGoneAsDisconnect
from ruvllm.deployments.ingress.errors import install_error_handlers

api = FastAPI(title="ruvllm-serve", docs_url=None, redoc_url=None)
install_error_handlers(api)
# A client gone mid-stream ends its call as ASGI's http.disconnect, not as an exception
# nobody retrieves (client_gone.py).
api.add_middleware(ClientGoneAsDisconnect)
