"""An OpenAPI document of the app's HTTP API, for the schema-driven fuzzer
(tests/e2e/test_http_fuzz.py).

The ingress's routes take the raw `Request` (it reads the body itself, with a size bound,
before any parsing), so FastAPI's /openapi.json names the routes but no request body.
The bodies here are vLLM's own request models (`ChatCompletionRequest`,
`CompletionRequest`: what the ingress validates with), narrowed so that every request the
fuzzer sends is cheap for a 2-core CI machine: at most 4 output tokens and 2 sequences, a
few short messages, and none of the fields that would make the server fetch URLs (image,
audio, video and file content parts) or compile client-supplied grammars.
"""

from __future__ import annotations

import copy
import json
from typing import Any

MAX_TOKENS = 4
MAX_SEQUENCES = 2
# Fields left out of the generated bodies: multimodal and transfer payloads, grammars and
# templates (their cost is the client's choice, not the API's shape), server-side ids.
DROPPED_FIELDS = frozenset({
    "response_format", "structured_outputs", "chat_template", "chat_template_kwargs",
    "documents", "kv_transfer_params", "ec_transfer_params", "mm_payload",
    "media_io_kwargs", "mm_processor_kwargs", "return_mm_kwargs", "vllm_xargs",
    "prompt_embeds", "request_id", "cache_salt", "xlora_scalings", "repetition_detection",
    "thinking_token_budget", "logprob_token_ids", "routed_experts_prompt_start",
})
MULTIMODAL = ("Image", "Audio", "Video", "File", "Embeds", "Media")
BOUNDED_INTEGERS = {"max_tokens": MAX_TOKENS, "max_completion_tokens": MAX_TOKENS,
                    "min_tokens": MAX_TOKENS, "n": MAX_SEQUENCES, "best_of": MAX_SEQUENCES,
                    "top_logprobs": 5, "prompt_logprobs": 5, "logprobs": 5}


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: ("#/components/schemas/" + v.removeprefix("#/$defs/")
                    if k == "$ref" and isinstance(v, str) else _rewrite_refs(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def _without_multimodal(node: Any) -> Any:
    """Drop anyOf/oneOf branches that reference multimodal content parts."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in ("anyOf", "oneOf") and isinstance(v, list):
                kept = [b for b in v if not any(m in json.dumps(b) for m in MULTIMODAL)
                        or "$ref" not in json.dumps(b)]
                out[k] = [_without_multimodal(b) for b in (kept or v)]
            else:
                out[k] = _without_multimodal(v)
        return out
    if isinstance(node, list):
        return [_without_multimodal(v) for v in node]
    return node


def _bounded(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    if name in BOUNDED_INTEGERS:
        limit = BOUNDED_INTEGERS[name]
        return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": limit},
                          {"type": "null"}]}
    if name == "messages":
        return {**schema, "minItems": 1, "maxItems": 4}
    if name == "stream":
        return {"type": "boolean"}
    return schema


def request_body_schema(model: Any, components: dict[str, Any]) -> dict[str, Any]:
    """One vLLM request model as an OpenAPI schema; its $defs go into `components`."""
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, _without_multimodal(_rewrite_refs(definition)))
    properties = {name: _bounded(name, _without_multimodal(_rewrite_refs(prop)))
                  for name, prop in schema["properties"].items() if name not in DROPPED_FIELDS}
    return {"type": "object", "properties": properties,
            "required": [r for r in schema.get("required", []) if r in properties]}


def openapi_document(chat_model: Any, completion_model: Any, model_names: list[str]) -> dict:
    """The app's routes (deployments/ingress/routes.py) with vLLM's request bodies; `model`
    picks among the served names, so that most requests reach the engines."""
    components: dict[str, Any] = {}
    chat = request_body_schema(chat_model, components)
    completion = request_body_schema(completion_model, components)
    for body in (chat, completion):
        body["properties"]["model"] = {"enum": model_names}
        body["required"] = sorted({*body["required"], "model"})
    completion["properties"]["prompt"] = {"anyOf": [
        {"type": "string", "maxLength": 200},
        {"type": "array", "items": {"type": "string", "maxLength": 50}, "maxItems": 2},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 20},
    ]}
    completion["required"] = sorted({*completion["required"], "prompt"})

    def post(body: dict[str, Any]) -> dict[str, Any]:
        return {"post": {"requestBody": {"required": True, "content": {
            "application/json": {"schema": body}}},
            "responses": {"200": {"description": "OK"}}}}

    def get() -> dict[str, Any]:
        return {"get": {"responses": {"200": {"description": "OK"}}}}

    adapter = {"type": "object", "properties": {"name": {"type": "string"},
                                                 "path": {"type": "string"}},
               "required": ["name", "path"]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ruvllm-serve", "version": "1"},
        "paths": {
            "/v1/chat/completions": post(chat),
            "/v1/completions": post(completion),
            "/v1/models": get(),
            "/health": get(),
            "/v1/adapters": {**get(), **post(adapter)},
            "/v1/adapters/{name}": {"delete": {
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}}}},
        },
        "components": {"schemas": copy.deepcopy(components)},
    }
