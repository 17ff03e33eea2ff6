"""What the ingress sends an engine replica, what the replica sends back, and the engine
protocol itself.

The ingress sends one `EngineRequest`: vLLM's own request model, parsed and validated
once on the ingress (`client_error.parse_request`), with the routing hints the request
router reads and the request id. A replica call is always a stream. Its first item is a `ReplyHead`; when the head
carries a `body` the reply is a complete JSON response, otherwise SSE text chunks
(`data: ...\\n\\n`, already in OpenAI's wire format) follow until the stream ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, AsyncIterator, Literal, Protocol

from ruvllm.router.hints import RoutingHints


@dataclass(frozen=True)
class EngineRequest:
    """One request on its way to a replica (`LLMReplica.generate`)."""

    kind: Literal["chat", "completion"]
    request: Any  # vLLM's ChatCompletionRequest / CompletionRequest, already validated
    request_id: str
    # Read by the request router from the call's first argument (router/hints.py).
    hints: RoutingHints | None = None
    # The X-LoRA debug field as the client sent it (None: absent); admin-checked already.
    xlora_scalings: Any = None


@dataclass(frozen=True)
class ReplyHead:
    status: int = 200
    body: dict[str, Any] | None = None
    replica_id: str = ""  # filled in by the replica deployment
    prepare_s: float = 0.0  # the replica's time before this head (deployments/server_timing.py)
    # The replica's engine had died before the request started: nothing ran, so the
    # ingress may send it to another replica.
    engine_dead: bool = False

    @property
    def is_stream(self) -> bool:
        return self.body is None


Reply = AsyncIterator["ReplyHead | str"]


@dataclass
class EngineStats:
    """A replica's load as the engine sees it, for routers and operators."""

    running: int = 0
    waiting: int = 0
    unfinished: int = 0  # requests the engine front end still tracks
    kv_usage: float = 0.0
    num_kv_blocks: int = 0
    block_size: int = 0
    max_num_seqs: int = 0
    max_model_len: int = 0
    dtype: str = ""  # what the engine computes in (the config's `auto` resolved)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    updated_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size


class Engine(Protocol):
    """The small surface a replica needs from an inference engine."""

    async def start(self) -> None: ...

    def chat(self, request: Any, request_id: str) -> AsyncIterator[ReplyHead | str]:
        """`request`: vLLM's ChatCompletionRequest, validated by the ingress."""
        ...

    def completion(self, request: Any, request_id: str) -> AsyncIterator[ReplyHead | str]:
        """`request`: vLLM's CompletionRequest, validated by the ingress."""
        ...

    def stats(self) -> EngineStats: ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def check_health(self) -> None: ...

    @property
    def is_dead(self) -> bool:
        """The engine can serve nothing more (its own process died) and the replica
        should be replaced."""
        ...

    def shutdown(self) -> None: ...


ENGINE_DIED = "the engine serving this request died; retry"


def engine_died_head() -> ReplyHead:
    """A replica's answer once its engine has died: a 503 the ingress may retry elsewhere."""
    return ReplyHead(503, error_body(503, ENGINE_DIED), engine_dead=True)


def error_body(
    status: int, message: str, err_type: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape, with vLLM's type names (BadRequestError, NotFoundError...)."""
    if err_type is None:
        err_type = HTTPStatus(status).phrase.replace(" ", "") + (
            "" if HTTPStatus(status).phrase.endswith("Error") else "Error"
        )
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}
