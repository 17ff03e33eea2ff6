"""A request refused as the client's fault: the HTTP status and OpenAI-shaped message to
answer, and the one place a body becomes vLLM's typed request (or such a refusal).

The ingress parses each body once, into vLLM's own request model, and hands the parsed
model to the replica (`protocol.EngineRequest`); engines never parse a body again, so
this is the only mapping from a validation failure to a 400.

pydantic validates a field typed `Iterable[...]` lazily, into a one-pass iterator: the
OpenAI message types vLLM's models use give one for a message's content in some shapes
(an empty content list, measured: `{"role": "developer", "content": []}`). Such an
iterator cannot be pickled, so the replica call carrying it failed (Ray's serializer:
"cannot pickle 'pydantic_core._pydantic_core.ValidatorIterator' object", a 503 in the
HTTP fuzz test), and the first reader of a one-pass iterator leaves nothing for the
next. The parsed request therefore holds lists only, their items validated here like
the rest (a bad item is this 400, not a failure on the replica).
"""

from __future__ import annotations

from collections.abc import Iterator
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
        request = request_cls.model_validate(body)
        updates = {}
        for name, value in request.__dict__.items():
            if isinstance(value, Iterator):
                value = updates[name] = list(value)
            _materialize(value)
        return request.model_copy(update=updates) if updates else request
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ClientError(400, f"{loc}: {err['msg']}" if loc else err["msg"], loc or None) from None
    except vllm_compat.client_error_types() as e:  # raised by vLLM's own request validators
        raise ClientError(400, str(e), getattr(e, "parameter", None)) from None


def _materialize(value: Any) -> None:
    """Replace, in place, every lazily validated iterator below `value` by a list."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, Iterator):
                value[key] = item = list(item)
            _materialize(item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, Iterator):
                value[i] = item = list(item)
            _materialize(item)
