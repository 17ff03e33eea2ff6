"""The ingress's inference routes (deployments/ingress/routes.py) without Serve around them:
the real tokenizer, admission pools and vLLM request models, a fake replica handle and
cluster view (pure logic; the HTTP suite runs the real app). A body is parsed once and
reaches the replica as vLLM's typed request inside an EngineRequest, with the routing
hints and tenant; what the ingress refuses maps to OpenAI errors in one place."""

from __future__ import annotations

import asyncio
import json
import types

import pytest
from starlette.requests import Request

from ruvllm.config import AppConfig
from ruvllm.deployments.client_error import ClientError
from ruvllm.deployments.protocol import ReplyHead


class Handle:
    """A replica deployment's handle: records the envelopes, answers with a JSON head."""

    def __init__(self):
        self.sent = []
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, envelope):
        self.sent.append(envelope)
        return Reply()


class Reply:
    """The replica call's stream: one JSON head."""

    def __init__(self):
        self.items = [ReplyHead(200, {"ok": True}, "replica-1")]

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        pass


@pytest.fixture(scope="module")
def ingress(base_model_path):
    from ruvllm.deployments import vllm_compat
    from ruvllm.deployments.auth import AdminGuard, ApiKeys
    from ruvllm.deployments.ingress import routes
    from ruvllm.deployments.ingress.admission_pools import AdmissionPools
    from ruvllm.deployments.ingress.tenants import Tenants
    from ruvllm.deployments.prompt import PromptInspector

    config = AppConfig.from_args(None)
    ingress = object.__new__(routes.OpenAIIngress)
    ingress.__dict__.update(
        _engine=Handle(), _dedicated={}, _dedicated_roots={}, _config=config,
        _base_name=config.model.name, _max_model_len=2048, _context_len=2048, _timeout_s=5.0,
        _max_body_bytes=1 << 20, _admin=AdminGuard(None),
        _tenants=Tenants(ApiKeys({}, None), config.admission.tenant_header),
        _prompts=PromptInspector(str(base_model_path), 32, 8, 2048), _max_sequences=16,
        _prompt_embeds=False, _chat_cls=vllm_compat.chat_request_cls(),
        _completion_cls=vllm_compat.completion_request_cls(),
        _admission=AdmissionPools(config.admission, [], 1),
        _cluster=types.SimpleNamespace(adapters={}, count_request=lambda _: None,
                                       capacity_share=None, stop=lambda: None))
    ingress._admission.set_capacity(None, 100_000, 64, None)
    routes._serve_request_id = lambda: "request-1"
    return ingress


def request(body) -> Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request({"type": "http", "method": "POST", "headers": [
        (b"content-type", b"application/json"), (b"x-tenant-id", b"team-a")]}, receive)


def test_a_chat_request_reaches_the_replica_parsed_with_its_hints(ingress):
    from ruvllm.deployments import vllm_compat

    body = {"model": ingress._base_name, "max_tokens": 5,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    response = asyncio.run(ingress.chat_completions(request(body)))
    assert response.status_code == 200 and response.headers["x-ruvllm-replica"] == "replica-1"
    envelope = ingress._engine.sent[-1]
    assert envelope.kind == "chat" and envelope.request_id == "request-1"
    assert isinstance(envelope.request, vllm_compat.chat_request_cls())
    assert envelope.request.max_tokens == 5 and envelope.xlora_scalings is None
    assert envelope.hints.tenant == "team-a" and envelope.hints.max_tokens == 5
    # the template makes it one 32-token block and more: one prefix key for the router
    assert envelope.hints.prompt_tokens > 32 and len(envelope.hints.prefix_keys) == 1


def test_the_engine_is_told_the_max_tokens_it_is_charged_for(ingress):
    response = asyncio.run(ingress.completions(request(
        {"model": ingress._base_name, "prompt": "Hello"})))
    assert response.status_code == 200
    envelope = ingress._engine.sent[-1]
    assert envelope.kind == "completion"
    assert envelope.request.max_tokens == envelope.hints.max_tokens == 16  # OpenAI's default


def test_the_xlora_debug_field_rides_in_the_envelope(ingress):
    asyncio.run(ingress.chat_completions(request(
        {"model": ingress._base_name, "xlora_scalings": False,
         "messages": [{"role": "user", "content": "hi"}]})))
    envelope = ingress._engine.sent[-1]
    assert envelope.xlora_scalings is False and "xlora_scalings" not in envelope.request.model_extra


def test_the_envelope_pickles_whatever_shape_the_messages_take(ingress):
    """Ray pickles the envelope to reach the replica: an empty content list validates
    into pydantic's lazy iterator, which does not pickle (the HTTP fuzz test's 503)."""
    import pickle

    messages = [{"role": "developer", "content": [], "name": "n"},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "user", "content": [], "extra-key": [None]}]
    response = asyncio.run(ingress.chat_completions(request(
        {"model": ingress._base_name, "max_tokens": 4, "messages": messages})))
    assert response.status_code == 200
    envelope = pickle.loads(pickle.dumps(ingress._engine.sent[-1]))
    assert [m["content"] for m in envelope.request.messages] == [
        [], [{"type": "text", "text": "Hi"}], []]


@pytest.mark.parametrize("body,status,param", [
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "not a list"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": 2**70}, 400, "top_k"),
    (b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}", 400, None),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
])
def test_what_the_ingress_refuses_is_a_client_error(ingress, body, status, param):
    if isinstance(body, dict):
        body = {"model": ingress._base_name, **body}
    sent = len(ingress._engine.sent)
    with pytest.raises(ClientError) as e:
        asyncio.run(ingress.chat_completions(request(body)))
    assert (e.value.status, e.value.param) == (status, param)
    assert len(ingress._engine.sent) == sent
