"""A request refused as the client's fault: the HTTP status and OpenAI-shaped message to
answer, and the one place a body becomes vLLM's typed request (or such a refusal).

The ingress parses each body once, into vLLM's own request model, and hands the parsed
model to the replica (`protocol.EngineRequest`); engines never parse a body again, so
this is the only mapping from a validation failure to a 400.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ruvllm.deployments import vllm_compat


class ClientError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def parse_request(request_cls: Any, body: dict[str, Any]) -> Any:
    """`body` validated into `request_cls` (vLLM's ChatCompletionRequest or
    CompletionRequest), or a 400 naming the first field at fault."""
    try:
        return request_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ClientError(400, f"{loc}: {err['msg']}" if loc else err["msg"], loc or None) from None
    except vllm_compat.client_error_types() as e:  # raised by vLLM's own request validators
        raise ClientError(400, str(e), getattr(e, "parameter", None)) from None
