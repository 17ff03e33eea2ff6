"""OpenAI-compatible HTTP ingress.

It checks what can be checked without the engine (JSON, field types through vLLM's own
request models, roles, model or adapter name), measures the prompt for the router,
admits the request (or queues it, or answers 429), and relays the replica's reply.
Everything the engine must judge (context length, sampling parameters) comes back from
vLLM's OpenAI layer as a 4xx body.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
import weakref
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.registry import AdapterError, AdapterSpec
from deployments import vllm_compat
from deployments.cluster_view import ClusterView
from deployments.controller import admin_token
from deployments.prompt import PromptInfo, PromptInspector
from deployments.protocol import ReplyHead, error_body
from router.admission import Admission, AdmissionController, Rejected
from router.hints import RoutingHints
from router.metrics import AdmissionMetrics
from ruvllm.config import AppConfig
from ruvllm.model_store import resolve_model

logger = logging.getLogger("ray.serve")

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
REPLICA_HEADER = "x-ruvllm-replica"
SESSION_HEADER = "x-session-id"

api = FastAPI(title="ruvllm-serve", docs_url=None, redoc_url=None)


class ClientError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def _error(status: int, message: str, param: str | None = None,
           headers: dict[str, str] | None = None, err_type: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, err_type=err_type, param=param),
                        status_code=status, headers=headers)


@api.exception_handler(ClientError)
async def _client_error(_: Request, exc: ClientError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.param, exc.headers)


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


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


class OpenAIIngress:
    """Registered as a Serve deployment with `serve.ingress(api)` by the app builder."""

    def __init__(self, engine: DeploymentHandle, controller: DeploymentHandle,
                 config: AppConfig,
                 dedicated: dict[str, tuple[DeploymentHandle, str]] | None = None) -> None:
        self._engine = engine
        # X-LoRA mixtures and quantized variants: their own deployments, by model name.
        self._dedicated = {name: handle for name, (handle, _) in (dedicated or {}).items()}
        self._dedicated_roots = {name: root for name, (_, root) in (dedicated or {}).items()}
        self._controller = controller
        self._config = config
        self._base_name = config.model.name
        self._max_model_len = config.engine.max_model_len
        self._timeout_s = config.ingress.request_timeout_s
        self._admin_token = admin_token(config)
        model_path = resolve_model(config.model.source, config.resolved_cache_dir)
        self._model_root = str(model_path)
        self._prompts = PromptInspector(self._model_root, config.engine.block_size or 16,
                                        config.router.prefix_max_blocks)
        self._chat_cls = vllm_compat.chat_request_cls()
        self._completion_cls = vllm_compat.completion_request_cls()
        self._client_errors = vllm_compat.client_error_types()
        self._card_cls, self._list_cls = vllm_compat.model_list_classes()

        self._admission_metrics = AdmissionMetrics()
        # One admission pool per set of engines: the base replicas (base model and LoRA
        # adapters) and each dedicated model's own replicas, so a burst on one never
        # borrows capacity the other's engines would have to provide.
        self._admission = AdmissionController(config.admission, on_change=self._admission_changed)
        self._dedicated_admission = {
            name: AdmissionController(config.admission, on_change=self._admission_changed)
            for name in self._dedicated}
        self._admission_pools = (self._admission, *self._dedicated_admission.values())
        ingress_share = max(1, config.ingress.num_replicas)

        def on_capacity(model: str | None, kv: int, seqs: int) -> None:
            pool = self._admission if model is None else self._dedicated_admission.get(model)
            if pool is not None:
                pool.set_capacity(kv // ingress_share, max(1, seqs // ingress_share) if seqs else 0)

        self._cluster = ClusterView(controller, config.placement.report_period_s, on_capacity)
        self._cluster.start()

    def __del__(self) -> None:
        cluster = getattr(self, "_cluster", None)
        if cluster is not None:
            cluster.stop()

    # -- plain endpoints -----------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        cards = [self._card_cls(id=self._base_name, root=self._model_root, owned_by="ruvllm",
                                max_model_len=self._max_model_len)]
        cards += [self._card_cls(id=name, root=spec.path, parent=self._base_name,
                                 owned_by="ruvllm", max_model_len=self._max_model_len)
                  for name, spec in sorted(self._cluster.adapters.items())]
        cards += [self._card_cls(id=name, root=root, parent=self._base_name, owned_by="ruvllm",
                                 max_model_len=self._max_model_len)
                  for name, root in sorted(self._dedicated_roots.items())]
        return JSONResponse(self._list_cls(data=cards).model_dump())

    # -- OpenAI inference ----------------------------------------------------------------

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
        adapter = await self._adapter_for(parsed.model)
        prompt = self._prompts.chat(body["messages"])
        max_tokens = parsed.max_completion_tokens or parsed.max_tokens
        return await self._forward("chat", request, body, parsed, adapter, prompt, max_tokens)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        body = await _read_json(request)
        parsed = self._validate(self._completion_cls, body)
        adapter = await self._adapter_for(parsed.model)
        prompt = self._prompts.completion(parsed.prompt)
        return await self._forward("completion", request, body, parsed, adapter, prompt,
                                   parsed.max_tokens)

    def _validate(self, request_cls: Any, body: dict[str, Any]) -> Any:
        try:
            return request_cls.model_validate(body)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise ClientError(400, message, param) from None
        except self._client_errors as e:  # raised by vLLM's own request validators
            raise ClientError(400, str(e), getattr(e, "parameter", None)) from None

    async def _adapter_for(self, model: str | None) -> AdapterSpec | None:
        if model in (None, self._base_name) or model in self._dedicated:
            return None
        spec = self._cluster.adapters.get(model)
        if spec is None:
            # Registered through another ingress moments ago? Look once more.
            try:
                await self._cluster.sync()
            except Exception:
                pass
            spec = self._cluster.adapters.get(model)
        if spec is None:
            known = [self._base_name, *sorted(self._dedicated), *sorted(self._cluster.adapters)]
            raise ClientError(404, f"The model `{model}` does not exist. Available: "
                              f"{', '.join(known[:20])}.", "model")
        return spec

    def _tenant(self, request: Request, parsed: Any) -> str:
        header = request.headers.get(self._config.admission.tenant_header)
        if header:
            return header
        key = _bearer(request)
        if key:  # never keep raw API keys around, even in memory-resident tables
            return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
        return getattr(parsed, "user", None) or "anonymous"

    async def _forward(self, method: str, request: Request, body: dict[str, Any], parsed: Any,
                       adapter: AdapterSpec | None, prompt: PromptInfo, max_tokens: int | None):
        # Serve's proxy takes the client's X-Request-ID (or makes one) and echoes it in
        # the response; use the same id for the engine request so logs line up.
        request_id = _serve_request_id() or uuid.uuid4().hex
        expected_output = max_tokens or self._config.admission.default_output_tokens
        if self._max_model_len:
            expected_output = min(expected_output, max(0, self._max_model_len - prompt.tokens))
        hints = RoutingHints(
            prompt_tokens=prompt.tokens,
            max_tokens=expected_output,
            model=parsed.model or self._base_name,
            adapter=adapter.name if adapter else None,
            adapter_path=adapter.path if adapter else None,
            session_id=request.headers.get(SESSION_HEADER),
            prefix_keys=prompt.prefix_keys,
            tenant=self._tenant(request, parsed),
        )
        admission = await self._admit(hints)
        if adapter is not None:
            self._cluster.count_request(adapter.name)
        engine = self._dedicated.get(parsed.model, self._engine)
        try:
            response = await self._dispatch(engine, method, body, request_id, hints, admission)
        except BaseException:
            admission.release()
            raise
        return response

    async def _admit(self, hints: RoutingHints) -> Admission:
        if not self._config.admission.enabled:
            return _UNLIMITED
        pool = self._dedicated_admission.get(hints.model, self._admission)
        try:
            admission = await pool.admit(hints.tenant or "anonymous", hints.predicted_tokens)
        except Rejected as r:
            self._admission_metrics.rejected.inc(tags={"reason": r.reason})
            raise ClientError(429, r.message, headers={"retry-after": str(r.retry_after_s)}) from None
        self._admission_metrics.admitted.inc()
        self._admission_metrics.queue_wait_seconds.observe(admission.waited_s)
        return admission

    async def _dispatch(self, engine: DeploymentHandle, method: str, body: dict[str, Any],
                        request_id: str, hints: RoutingHints, admission: Admission):
        reply = getattr(engine.options(stream=True), method).remote(
            body, request_id, hints=hints)
        watchdog = Watchdog(self._timeout_s, reply.cancel)
        try:
            head: ReplyHead = await reply.__anext__()
        except asyncio.CancelledError:
            watchdog.disarm()
            reply.cancel()
            raise
        except Exception as e:
            watchdog.disarm()
            admission.release()
            if watchdog.fired:
                return _error(504, f"request {request_id} timed out after {self._timeout_s:g} s")
            logger.warning("request %s failed before a reply: %r", request_id, e)
            return _error(503, "no engine replica could serve the request; retry",
                          headers={"retry-after": "1"})
        headers = {REPLICA_HEADER: head.replica_id}
        if not head.is_stream:
            watchdog.disarm()
            admission.release()
            return JSONResponse(head.body, status_code=head.status, headers=headers)
        stream = self._relay(reply, request_id, watchdog, admission)
        # If the client is gone before the body starts, the generator never runs its
        # `finally`; releasing when it is collected keeps capacity from leaking.
        weakref.finalize(stream, admission.release)
        weakref.finalize(stream, watchdog.disarm)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    async def _relay(self, reply: Any, request_id: str, watchdog: "Watchdog",
                     admission: Admission) -> AsyncIterator[str]:
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
            admission.release()

    def _admission_changed(self, _: AdmissionController) -> None:
        # Pools change only once requests arrive, after __init__ has built all of them.
        pools = self._admission_pools
        self._admission_metrics.queued.set(sum(p.queued for p in pools))
        self._admission_metrics.inflight_tokens.set(sum(p.inflight_tokens for p in pools))

    # -- adapter administration ----------------------------------------------------------

    def _check_admin(self, request: Request) -> None:
        if self._admin_token is None:
            return
        given = _bearer(request)
        if given is None:
            raise ClientError(401, "admin endpoint: missing bearer token")
        if not hashlib.sha256(given.encode()).digest() == hashlib.sha256(
                self._admin_token.encode()).digest():
            raise ClientError(403, "admin endpoint: wrong token")

    @api.get("/v1/adapters")
    async def list_adapters(self, request: Request) -> JSONResponse:
        self._check_admin(request)
        return JSONResponse(await self._controller.describe.remote())

    @api.post("/v1/adapters")
    async def register_adapter(self, request: Request) -> JSONResponse:
        self._check_admin(request)
        body = await _read_json(request)
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
        self._check_admin(request)
        result = await self._controller.unregister_adapter.remote(name)
        if isinstance(result, AdapterError):
            raise ClientError(result.status, result.message)
        self._cluster.drop_adapter(name)
        return JSONResponse({"name": name, "deleted": True})


class _Unlimited(Admission):
    def __init__(self) -> None:
        self.tenant, self.tokens, self.waited_s = "", 0, 0.0

    def release(self) -> None:
        pass


_UNLIMITED = _Unlimited()


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
