"""OpenAI-compatible HTTP ingress.

It checks what can be checked without the engine (JSON, field types through vLLM's own
request models, roles, model name), estimates the request's token footprint for the
router, and relays the replica's reply. Everything the engine must judge (context
length, sampling parameters) comes back from vLLM's OpenAI layer as a 4xx body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import vllm_compat
from deployments.protocol import ReplyHead, error_body
from router.hints import RoutingHints
from ruvllm.config import AppConfig
from ruvllm.model_store import resolve_model

logger = logging.getLogger("ray.serve")

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
REPLICA_HEADER = "x-ruvllm-replica"

api = FastAPI(title="ruvllm-serve", docs_url=None, redoc_url=None)


class ClientError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error(status: int, message: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param), status_code=status,
                        headers=headers)


@api.exception_handler(ClientError)
async def _client_error(_: Request, exc: ClientError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.param)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, TaskCancelledError):  # the client went away mid-stream
        logger.info("client disconnected: %s", exc)
    else:
        logger.exception("unhandled error in ingress")
    return _error(500, f"internal error: {type(exc).__name__}")


async def _read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClientError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ClientError(400, "request body must be a JSON object")
    return body


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return (f"{loc}: {err['msg']}" if loc else err["msg"]), (loc or None)


class TokenEstimator:
    """Prompt size in tokens, for the router's load accounting."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(model_path)

    def chat(self, messages: list[dict[str, Any]]) -> int:
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # tool calls, multimodal parts: count the text alone
            text = " ".join(str(m.get("content") or "") for m in messages)
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, prompt: Any) -> int:
        if isinstance(prompt, str):
            return len(self._tokenizer(prompt)["input_ids"])
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return len(prompt)
        if isinstance(prompt, list):
            return max((self.text(p) for p in prompt), default=0)
        return 0


class OpenAIIngress:
    """Registered as a Serve deployment with `serve.ingress(api)` by the app builder."""

    def __init__(self, engine: DeploymentHandle, config: AppConfig) -> None:
        self._engine = engine
        self._config = config
        self._served_name = config.model.name
        self._max_model_len = config.engine.max_model_len
        self._timeout_s = config.ingress.request_timeout_s
        model_path = resolve_model(config.model.source, config.resolved_cache_dir)
        self._tokens = TokenEstimator(str(model_path))
        self._chat_cls = vllm_compat.chat_request_cls()
        self._completion_cls = vllm_compat.completion_request_cls()
        self._client_errors = vllm_compat.client_error_types()
        card_cls, list_cls = vllm_compat.model_list_classes()
        self._models = list_cls(data=[card_cls(
            id=self._served_name, root=str(model_path), owned_by="ruvllm",
            max_model_len=self._max_model_len,
        )]).model_dump()

    @api.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse(self._models)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await _read_json(request)
        parsed = self._validate(self._chat_cls, body)
        if not parsed.messages:
            raise ClientError(400, "messages must contain at least one message", "messages")
        for i, message in enumerate(body["messages"]):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in CHAT_ROLES:
                raise ClientError(400, f"messages.{i}.role: unknown role {role!r}; expected "
                                  f"one of {sorted(CHAT_ROLES)}", f"messages.{i}.role")
        prompt_tokens = self._tokens.chat(body["messages"])
        max_tokens = parsed.max_completion_tokens or parsed.max_tokens
        return await self._forward("chat", request, body, parsed, prompt_tokens, max_tokens)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        body = await _read_json(request)
        parsed = self._validate(self._completion_cls, body)
        prompt_tokens = self._tokens.text(parsed.prompt)
        return await self._forward("completion", request, body, parsed, prompt_tokens,
                                   parsed.max_tokens)

    def _validate(self, request_cls: Any, body: dict[str, Any]) -> Any:
        try:
            parsed = request_cls.model_validate(body)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise ClientError(400, message, param) from None
        except self._client_errors as e:  # raised by vLLM's own request validators
            raise ClientError(400, str(e), getattr(e, "parameter", None)) from None
        if parsed.model not in (None, self._served_name):
            raise ClientError(404, f"The model `{parsed.model}` does not exist. "
                              f"Available: {self._served_name}.", "model")
        return parsed

    async def _forward(self, method: str, request: Request, body: dict[str, Any], parsed: Any,
                       prompt_tokens: int, max_tokens: int | None):
        # Serve's proxy takes the client's X-Request-ID (or makes one) and echoes it in
        # the response; use the same id for the engine request so logs line up.
        request_id = _serve_request_id() or uuid.uuid4().hex
        if max_tokens is None and self._max_model_len:
            max_tokens = max(0, self._max_model_len - prompt_tokens)
        hints = RoutingHints(
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens or 0,
            model=parsed.model or self._served_name,
            session_id=request.headers.get("x-session-id") or getattr(parsed, "user", None),
            tenant=getattr(parsed, "user", None),
        )
        reply = getattr(self._engine.options(stream=True), method).remote(
            body, request_id, hints=hints)
        watchdog = Watchdog(self._timeout_s, reply.cancel)
        headers: dict[str, str] = {}
        try:
            head: ReplyHead = await reply.__anext__()
        except asyncio.CancelledError:
            watchdog.disarm()
            reply.cancel()
            raise
        except Exception as e:
            watchdog.disarm()
            if watchdog.fired:
                return _error(504, f"request {request_id} timed out after {self._timeout_s:g} s",
                              headers=headers)
            logger.warning("request %s failed before a reply: %r", request_id, e)
            return _error(503, "no engine replica could serve the request; retry",
                          headers={**headers, "retry-after": "1"})
        headers[REPLICA_HEADER] = head.replica_id
        if not head.is_stream:
            watchdog.disarm()
            return JSONResponse(head.body, status_code=head.status, headers=headers)
        return StreamingResponse(self._relay(reply, request_id, watchdog),
                                 media_type="text/event-stream", headers=headers)

    async def _relay(self, reply: Any, request_id: str, watchdog: "Watchdog") -> AsyncIterator[str]:
        try:
            async for chunk in reply:
                yield chunk
        except asyncio.CancelledError:
            # The client went away: stop the replica's generator so the engine aborts.
            reply.cancel()
            raise
        except Exception as e:
            if watchdog.fired:
                yield _sse_error(504, f"request {request_id} exceeded its deadline")
            else:
                logger.warning("stream %s broke: %r", request_id, e)
                yield _sse_error(503, "the engine replica serving this stream failed")
            yield "data: [DONE]\n\n"
        finally:
            watchdog.disarm()


class Watchdog:
    """Cancels a request at its deadline without a timer task per streamed chunk."""

    def __init__(self, timeout_s: float, on_fire: Any) -> None:
        self.fired = False
        self._on_fire = on_fire
        self._handle = asyncio.get_running_loop().call_later(timeout_s, self._fire)

    def _fire(self) -> None:
        self.fired = True
        self._on_fire()

    def disarm(self) -> None:
        self._handle.cancel()


def _serve_request_id() -> str:
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id


def _sse_error(status: int, message: str) -> str:
    return f"data: {json.dumps(error_body(status, message))}\n\n"


def ingress_deployment():
    return serve.deployment(serve.ingress(api)(OpenAIIngress))
