"""The ingress's one error-mapping path: whatever goes wrong is answered in OpenAI's
error shape, `{"error": {"message", "type", "param", "code"}}`.

A request the ingress refuses raises `ClientError` (deployments/client_error.py, which
also maps a body's validation failure); routing's own errors (unknown route or method)
keep their status; anything unexpected is a 500 that names only the exception's type.
A stream whose headers are already sent ends with an error event instead.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray.exceptions import TaskCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ruvllm.deployments.client_error import ClientError
from ruvllm.deployments.protocol import error_body

logger = logging.getLogger("ray.serve")


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None,
                   err_type: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, err_type=err_type, param=param),
                        status_code=status, headers=headers)


def sse_error(status: int, message: str) -> str:
    """The event that ends a stream which can no longer change its status."""
    return f"data: {json.dumps(error_body(status, message))}\n\n"


async def _client_error(_: Request, exc: ClientError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.headers)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, TaskCancelledError):  # the client went away mid-stream
        logger.info("client disconnected: %s", exc)
    else:
        logger.exception("unhandled error in ingress")
    return error_response(500, f"internal error: {type(exc).__name__}")


def install_error_handlers(api: FastAPI) -> None:
    api.add_exception_handler(ClientError, _client_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected)
