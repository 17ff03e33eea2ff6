"""OpenAI-compatible HTTP ingress.

It checks what can be checked without the engine (credentials, body size, JSON, field
types through vLLM's own request models, roles, model or adapter name, bounds), measures
the prompt for the router (in a worker thread, after a size bound that refuses a
far-too-long prompt at once), charges the request as the engine will run it, admits it
(or queues it, or answers 429), and relays the replica's reply. Everything the engine
must judge (exact context length, sampling parameters) comes back from vLLM's OpenAI
layer as a 4xx body.
"""

from __future__ import annotations

import asyncio
import dataclasses
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

from ruvllm.adapters.registry import AdapterError, AdapterSpec
from ruvllm.deployments import readiness, request_limits, vllm_compat
from ruvllm.deployments.auth import AdminGuard, ApiKeys, admin_token, bearer, digest
from ruvllm.deployments.client_error import ClientError
from ruvllm.deployments.client_gone import ClientGoneAsDisconnect
from ruvllm.deployments.cluster_view import ClusterView
from ruvllm.deployments.footprint import Footprint, request_footprint
from ruvllm.deployments.prompt import PromptInfo, PromptInspector, PromptTooLong
from ruvllm.deployments.protocol import ReplyHead, error_body
from ruvllm.deployments.server_timing import RequestTimer
from ruvllm.admission.controller import Admission, AdmissionController, Rejected, TooLarge
from ruvllm.router.hints import RoutingHints
from ruvllm.router.metrics import AdmissionMetrics
from ruvllm.config import AppConfig
from ruvllm.model_store import resolve_model

logger = logging.getLogger("ray.serve")

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
REPLICA_HEADER = "x-ruvllm-replica"
SESSION_HEADER = "x-session-id"
XLORA_SCALINGS_FIELD = "xlora_scalings"  # the replica's debug field (admin only)

api = FastAPI(title="ruvllm-serve", docs_url=None, redoc_url=None)
api.add_middleware(ClientGoneAsDisconnect)


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


async def _read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    raw = await request_limits.read_body(
        request.stream(), request.headers.get("content-length"), max_bytes)
    return request_limits.parse_json_object(raw)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return (f"{loc}: {err['msg']}" if loc else err["msg"]), (loc or None)


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
        self._max_body_bytes = config.ingress.max_body_bytes
        self._admin = AdminGuard(admin_token(config))
        self._api_keys = ApiKeys(config.ingress.api_keys, config.ingress.api_keys_file)
        model_path = resolve_model(config.model.source, config.resolved_cache_dir)
        self._model_root = str(model_path)
        self._context_len = self._max_model_len or _model_context_len(model_path)
        self._prompts = PromptInspector(self._model_root, config.engine.block_size or 16,
                                        config.router.prefix_max_blocks, self._context_len)
        self._max_sequences = min(config.admission.max_sequences, config.engine.max_num_seqs)
        self._prompt_embeds = bool(config.engine.extra_engine_args.get("enable_prompt_embeds"))
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

        self._capacity: dict[str | None, int] = {}

        def on_capacity(model: str | None, kv: int, seqs: int) -> None:
            self._capacity[model] = kv
            pool = self._admission if model is None else self._dedicated_admission.get(model)
            if pool is None:
                return
            # The controller's share follows the tenants this ingress serves, so fair
            # queuing here adds up to weighted shares cluster-wide; an equal split until
            # it has answered.
            share = self._cluster.capacity_share
            if share is None:
                pool.set_capacity(kv // ingress_share, max(1, seqs // ingress_share) if seqs else 0)
            else:
                pool.set_capacity(int(kv * share), max(1, int(seqs * share)) if seqs else 0)

        def tenant_demand() -> dict[str, tuple[int, int]]:
            # One share for all of this ingress's pools, from their demand summed.
            out: dict[str, tuple[int, int]] = {}
            for pool in self._admission_pools:
                for tenant, (tokens, seqs) in pool.tenant_demand().items():
                    had = out.get(tenant, (0, 0))
                    out[tenant] = (had[0] + tokens, had[1] + seqs)
            return out

        self._cluster = ClusterView(controller, config.placement.report_period_s, on_capacity,
                                    tenant_demand)
        self._cluster.start()

    def __del__(self) -> None:
        cluster = getattr(self, "_cluster", None)
        if cluster is not None:
            cluster.stop()

    # -- plain endpoints -----------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> JSONResponse:
        status, body = readiness.health(self._base_name, self._capacity, self._dedicated)
        return JSONResponse(body, status_code=status)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authenticate(request)
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
        timer = RequestTimer()
        tenant = self._authenticate(request)
        body = await self._read_request(request)
        parsed = self._validate(self._chat_cls, body)
        if not parsed.messages:
            raise ClientError(400, "messages must contain at least one message", "messages")
        for i, message in enumerate(body["messages"]):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in CHAT_ROLES:
                raise ClientError(400, f"messages.{i}.role: unknown role {role!r}; expected "
                                  f"one of {sorted(CHAT_ROLES)}", f"messages.{i}.role")
        adapter = await self._adapter_for(parsed.model)
        prompt = await self._measure(self._prompts.check_chat_size, self._prompts.chat,
                                     body["messages"])
        # vLLM: max_completion_tokens wins; an explicit 0 is the client's, not "omitted".
        max_tokens = next((v for v in (parsed.max_completion_tokens, parsed.max_tokens)
                           if v is not None), None)
        return await self._forward("chat", request, body, parsed, adapter, prompt, max_tokens,
                                   tenant, "max_completion_tokens", timer)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        timer = RequestTimer()
        tenant = self._authenticate(request)
        body = await self._read_request(request)
        parsed = self._validate(self._completion_cls, body)
        if getattr(parsed, "prompt_embeds", None) and not self._prompt_embeds:
            raise ClientError(400, "prompt_embeds is not supported by this server "
                              "(enable_prompt_embeds is off)", "prompt_embeds")
        adapter = await self._adapter_for(parsed.model)
        prompt = await self._measure(self._prompts.check_completion_size,
                                     self._prompts.completion, parsed.prompt)
        if getattr(parsed, "prompt_embeds", None):
            embeds = parsed.prompt_embeds
            count = len(embeds) if isinstance(embeds, list) else 1
            # Their length is unknown until decoded on the replica: charge the context.
            prompt = PromptInfo(self._context_len, (), prompt.lengths + (self._context_len,) * count)
        # CompletionRequest defaults an omitted max_tokens to 16 (OpenAI's default).
        return await self._forward("completion", request, body, parsed, adapter, prompt,
                                   parsed.max_tokens, tenant, "max_tokens", timer)

    async def _read_request(self, request: Request) -> dict[str, Any]:
        body = await _read_json(request, self._max_body_bytes)
        request_limits.check_fields(body)
        request_limits.check_headers(
            request.headers, (SESSION_HEADER, self._config.admission.tenant_header))
        if body.get(XLORA_SCALINGS_FIELD) not in (None, False):
            # A full transformers forward on the replica per request: operators only.
            self._admin.check(request.headers, what=f"the {XLORA_SCALINGS_FIELD} debug field")
        return body

    async def _measure(self, check: Any, count: Any, prompt: Any) -> PromptInfo:
        """The cheap size bound on the event loop, the tokenizer in a worker thread."""
        try:
            check(prompt)
        except PromptTooLong as e:
            raise ClientError(400, e.message, e.param) from None
        return await asyncio.to_thread(count, prompt)

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

    def _authenticate(self, request: Request) -> str | None:
        """With API keys on: the key's tenant, or 401. Off: None (tenant from the request)."""
        if not self._api_keys.enabled:
            return None
        tenant = self._api_keys.tenant_for(bearer(request.headers))
        if tenant is None:
            raise ClientError(401, "a valid API key is required "
                              "(Authorization: Bearer <key>)",
                              headers={"www-authenticate": "Bearer"})
        return tenant

    def _tenant(self, request: Request, parsed: Any) -> str:
        """Without API keys, the tenant the client names: fairness between cooperating
        clients, not security (admission bounds how many names it keeps apart)."""
        header = request.headers.get(self._config.admission.tenant_header)
        if header:
            return header
        key = bearer(request.headers)
        if key:  # never keep raw API keys around, even in memory-resident tables
            return "key:" + digest(key)[:16]
        return getattr(parsed, "user", None) or "anonymous"

    def _footprint(self, parsed: Any, prompt: PromptInfo, max_tokens: int | None) -> Footprint:
        samples = max(getattr(parsed, "n", None) or 1, getattr(parsed, "best_of", None) or 1)
        footprint = request_footprint(list(prompt.lengths), samples, max_tokens,
                                      self._context_len,
                                      self._config.admission.default_output_tokens)
        if footprint.sequences > self._max_sequences:
            raise ClientError(400, f"n: this request asks for {footprint.sequences} sequences "
                              f"(n or best_of, times its prompts); at most {self._max_sequences}"
                              " per request", "n")
        return footprint

    async def _forward(self, method: str, request: Request, body: dict[str, Any], parsed: Any,
                       adapter: AdapterSpec | None, prompt: PromptInfo, max_tokens: int | None,
                       tenant: str | None, max_tokens_field: str, timer: RequestTimer):
        # Serve's proxy takes the client's X-Request-ID (or makes one) and echoes it in
        # the response; use the same id for the engine request so logs line up.
        request_id = _serve_request_id() or uuid.uuid4().hex
        footprint = self._footprint(parsed, prompt, max_tokens)
        if footprint.max_tokens_for_engine is not None:
            body = {**body, max_tokens_field: footprint.max_tokens_for_engine}
        hints = RoutingHints(
            prompt_tokens=footprint.prompt_tokens,
            max_tokens=footprint.output_tokens,
            sequences=footprint.sequences,
            model=parsed.model or self._base_name,
            adapter=adapter.name if adapter else None,
            adapter_path=adapter.path if adapter else None,
            session_id=request.headers.get(SESSION_HEADER),
            prefix_keys=prompt.prefix_keys,
            tenant=tenant or self._tenant(request, parsed),
        )
        timer.mark_prepared()
        admission = await self._admit(hints)
        timer.mark_admitted()
        if adapter is not None:
            self._cluster.count_request(adapter.name)
        engine = self._dedicated.get(parsed.model, self._engine)
        try:
            response = await self._dispatch(engine, method, body, request_id, hints, admission,
                                            timer)
        except BaseException:
            admission.release()
            raise
        return response

    async def _admit(self, hints: RoutingHints) -> Admission:
        if not self._config.admission.enabled:
            return _UNLIMITED
        pool = self._dedicated_admission.get(hints.model, self._admission)
        try:
            admission = await pool.admit(hints.tenant or "anonymous", hints.predicted_tokens,
                                         seqs=hints.sequences)
        except TooLarge as e:  # no wait can help: not a 429 to retry
            self._admission_metrics.rejected.inc(tags={"reason": "too_large"})
            raise ClientError(400, e.message, "max_tokens") from None
        except Rejected as r:
            self._admission_metrics.rejected.inc(tags={"reason": r.reason})
            raise ClientError(429, r.message, headers={"retry-after": str(r.retry_after_s)}) from None
        self._admission_metrics.admitted.inc()
        self._admission_metrics.queue_wait_seconds.observe(admission.waited_s)
        return admission

    async def _dispatch(self, engine: DeploymentHandle, method: str, body: dict[str, Any],
                        request_id: str, hints: RoutingHints, admission: Admission,
                        timer: RequestTimer):
        call = getattr(engine.options(stream=True), method)
        reply = call.remote(body, request_id, hints=hints)
        watchdog = Watchdog(self._timeout_s, lambda: reply.cancel())
        try:
            head: ReplyHead = await reply.__anext__()
            if head.engine_dead and hints.avoid_replica is None:
                # Nothing ran there: once more, elsewhere; the hint also tells this
                # ingress's router to leave that replica out from now on.
                reply.cancel()
                hints = dataclasses.replace(hints, avoid_replica=head.replica_id)
                reply = call.remote(body, request_id, hints=hints)
                head = await reply.__anext__()
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
        headers = {REPLICA_HEADER: head.replica_id, "server-timing": timer.header(head.prepare_s)}
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

    @api.get("/v1/adapters")
    async def list_adapters(self, request: Request) -> JSONResponse:
        self._admin.check(request.headers)
        return JSONResponse(await self._controller.describe.remote())

    @api.post("/v1/adapters")
    async def register_adapter(self, request: Request) -> JSONResponse:
        self._admin.check(request.headers, json_body=True)
        body = await _read_json(request, self._max_body_bytes)
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


class _Unlimited(Admission):
    def __init__(self) -> None:
        self.tenant, self.tokens, self.seqs, self.waited_s = "", 0, 0, 0.0

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


def _model_context_len(model_path: Any) -> int:
    """The checkpoint's own context when engine.max_model_len is unset (vLLM's default)."""
    config = json.loads((model_path / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 2048)


def _serve_request_id() -> str:
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id


def _sse_error(status: int, message: str) -> str:
    return f"data: {json.dumps(error_body(status, message))}\n\n"


def ingress_deployment():
    return serve.deployment(serve.ingress(api)(OpenAIIngress))
