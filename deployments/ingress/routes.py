"""The OpenAI routes of the ingress and the path of an inference request through it.

A request is checked for what can be judged without the engine (credentials, body size,
JSON, field types through vLLM's own request models, parsed once here, roles, model or
adapter name, bounds), its prompt is measured for the router (in a worker thread, after
a size bound that refuses a far-too-long prompt at once), it is charged as the engine
will run it and admitted (or queued, or answered 429), and the parsed request goes to a
replica in a typed envelope (`protocol.EngineRequest`). Everything the engine must judge
(exact context length, sampling parameters) comes back from vLLM's OpenAI layer as a
4xx body.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from ruvllm.adapters.registry import AdapterSpec
from ruvllm.config import AppConfig
from ruvllm.deployments import readiness, request_limits, vllm_compat
from ruvllm.deployments.auth import AdminGuard, ApiKeys, admin_token
from ruvllm.deployments.client_error import ClientError, parse_request
from ruvllm.deployments.cluster_view import ClusterView
from ruvllm.deployments.footprint import Footprint, request_footprint
from ruvllm.deployments.ingress.admin import AdapterAdminRoutes
from ruvllm.deployments.ingress.admission_pools import AdmissionPools
from ruvllm.deployments.ingress.api import api
from ruvllm.deployments.ingress.relay import relay_reply
from ruvllm.deployments.ingress.tenants import Tenants
from ruvllm.deployments.prompt import PromptInfo, PromptInspector, PromptTooLong
from ruvllm.deployments.protocol import EngineRequest
from ruvllm.deployments.server_timing import RequestTimer
from ruvllm.model_store import resolve_model
from ruvllm.router.hints import RoutingHints

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
SESSION_HEADER = "x-session-id"
XLORA_SCALINGS_FIELD = "xlora_scalings"  # the replica's debug field (admin only)


class OpenAIIngress(AdapterAdminRoutes):
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
        self._tenants = Tenants(ApiKeys(config.ingress.api_keys, config.ingress.api_keys_file),
                                config.admission.tenant_header)
        model_path = resolve_model(config.model.source, config.resolved_cache_dir)
        self._model_root = str(model_path)
        self._context_len = self._max_model_len or _model_context_len(model_path)
        self._prompts = PromptInspector(self._model_root, config.engine.block_size or 16,
                                        config.router.prefix_max_blocks, self._context_len)
        self._max_sequences = min(config.admission.max_sequences, config.engine.max_num_seqs)
        self._prompt_embeds = bool(config.engine.extra_engine_args.get("enable_prompt_embeds"))
        self._chat_cls = vllm_compat.chat_request_cls()
        self._completion_cls = vllm_compat.completion_request_cls()
        self._card_cls, self._list_cls = vllm_compat.model_list_classes()
        self._admission = AdmissionPools(config.admission, self._dedicated,
                                         config.ingress.num_replicas)
        self._cluster = ClusterView(
            controller, config.placement.report_period_s,
            lambda model, kv, seqs: self._admission.set_capacity(
                model, kv, seqs, self._cluster.capacity_share),
            self._admission.tenant_demand)
        self._cluster.start()

    def __del__(self) -> None:
        cluster = getattr(self, "_cluster", None)
        if cluster is not None:
            cluster.stop()

    # -- plain endpoints -----------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> JSONResponse:
        status, body = readiness.health(self._base_name, self._admission.capacity,
                                        self._dedicated)
        return JSONResponse(body, status_code=status)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._tenants.authenticate(request)
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
        tenant = self._tenants.authenticate(request)
        body = await self._read_request(request)
        parsed = parse_request(self._chat_cls, body)
        if not parsed.messages:
            raise ClientError(400, "messages must contain at least one message", "messages")
        for i, message in enumerate(parsed.messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in CHAT_ROLES:
                raise ClientError(400, f"messages.{i}.role: unknown role {role!r}; expected "
                                  f"one of {sorted(CHAT_ROLES)}", f"messages.{i}.role")
        adapter = await self._adapter_for(parsed.model)
        prompt = await self._measure(self._prompts.check_chat_size, self._prompts.chat,
                                     parsed.messages)
        # vLLM: max_completion_tokens wins; an explicit 0 is the client's, not "omitted".
        max_tokens = next((v for v in (parsed.max_completion_tokens, parsed.max_tokens)
                           if v is not None), None)
        return await self._forward("chat", request, parsed, adapter, prompt, max_tokens,
                                   tenant, "max_completion_tokens", timer)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        timer = RequestTimer()
        tenant = self._tenants.authenticate(request)
        body = await self._read_request(request)
        parsed = parse_request(self._completion_cls, body)
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
        return await self._forward("completion", request, parsed, adapter, prompt,
                                   parsed.max_tokens, tenant, "max_tokens", timer)

    async def _read_request(self, request: Request) -> dict[str, Any]:
        body = await request_limits.read_json_object(request, self._max_body_bytes)
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

    async def _forward(self, kind: str, request: Request, parsed: Any,
                       adapter: AdapterSpec | None, prompt: PromptInfo, max_tokens: int | None,
                       tenant: str | None, max_tokens_field: str, timer: RequestTimer):
        # Serve's proxy takes the client's X-Request-ID (or makes one) and echoes it in
        # the response; use the same id for the engine request so logs line up.
        request_id = _serve_request_id() or uuid.uuid4().hex
        footprint = self._footprint(parsed, prompt, max_tokens)
        # The debug field rides in the envelope, not as an unknown field of vLLM's model.
        xlora_scalings = (parsed.model_extra or {}).pop(XLORA_SCALINGS_FIELD, None)
        if footprint.max_tokens_for_engine is not None:
            parsed = parsed.model_copy(
                update={max_tokens_field: footprint.max_tokens_for_engine})
        hints = RoutingHints(
            prompt_tokens=footprint.prompt_tokens,
            max_tokens=footprint.output_tokens,
            sequences=footprint.sequences,
            model=parsed.model or self._base_name,
            adapter=adapter.name if adapter else None,
            adapter_path=adapter.path if adapter else None,
            session_id=request.headers.get(SESSION_HEADER),
            prefix_keys=prompt.prefix_keys,
            tenant=tenant or self._tenants.named_by_client(request, parsed),
        )
        timer.mark_prepared()
        admission = await self._admission.admit(hints)
        timer.mark_admitted()
        if adapter is not None:
            self._cluster.count_request(adapter.name)
        engine = self._dedicated.get(parsed.model, self._engine)
        envelope = EngineRequest(kind, parsed, request_id, hints, xlora_scalings)
        try:
            return await relay_reply(engine, envelope, admission, timer, self._timeout_s)
        except BaseException:
            admission.release()
            raise


def _model_context_len(model_path: Any) -> int:
    """The checkpoint's own context when engine.max_model_len is unset (vLLM's default)."""
    config = json.loads((model_path / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 2048)


def _serve_request_id() -> str:
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id


def ingress_deployment():
    return serve.deployment(serve.ingress(api)(OpenAIIngress))
