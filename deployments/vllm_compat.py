"""Import locations of the vLLM pieces ruvllm reuses.

GPU machines run vLLM 0.26 (pinned to their torch), the CPU build is 0.32, and several
OpenAI-layer modules moved in between. Everything version-dependent is imported here.
"""

from __future__ import annotations

import importlib
from typing import Any


def _first(*candidates: tuple[str, str]) -> Any:
    errors = []
    for module, attr in candidates:
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            errors.append(f"{module}.{attr}: {e}")
    raise ImportError("none of the known vLLM locations worked:\n  " + "\n  ".join(errors))


def chat_request_cls() -> Any:
    return _first(
        ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
        ("vllm.entrypoints.openai.protocol", "ChatCompletionRequest"),
    )


def completion_request_cls() -> Any:
    return _first(
        ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
        ("vllm.entrypoints.openai.protocol", "CompletionRequest"),
    )


def error_response_cls() -> Any:
    return _first(
        ("vllm.entrypoints.serve.engine.protocol", "ErrorResponse"),
        ("vllm.entrypoints.openai.protocol", "ErrorResponse"),
    )


def model_list_classes() -> tuple[Any, Any]:
    card = _first(
        ("vllm.entrypoints.serve.engine.protocol", "ModelCard"),
        ("vllm.entrypoints.openai.protocol", "ModelCard"),
    )
    listing = _first(
        ("vllm.entrypoints.serve.engine.protocol", "ModelList"),
        ("vllm.entrypoints.openai.protocol", "ModelList"),
    )
    return card, listing


def init_app_state() -> Any:
    return _first(
        ("vllm.entrypoints.launchers.api_server.app_state", "init_app_state"),
        ("vllm.entrypoints.openai.api_server", "init_app_state"),
    )


def openai_arg_parser() -> Any:
    make_arg_parser = _first(
        ("vllm.entrypoints.launchers.cli_args", "make_arg_parser"),
        ("vllm.entrypoints.openai.cli_args", "make_arg_parser"),
    )
    parser_cls = _first(
        ("vllm.utils.argparse_utils", "FlexibleArgumentParser"),
        ("vllm.utils", "FlexibleArgumentParser"),
    )
    return make_arg_parser(parser_cls())


def client_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions vLLM raises for a bad request (some from inside request validators)."""
    try:
        from vllm.exceptions import VLLMClientError

        return (VLLMClientError, ValueError)
    except ImportError:
        return (ValueError,)


def lora_admin_requests() -> tuple[Any, Any]:
    load = _first(
        ("vllm.entrypoints.serve.lora.protocol", "LoadLoRAAdapterRequest"),
        ("vllm.entrypoints.openai.protocol", "LoadLoRAAdapterRequest"),
    )
    unload = _first(
        ("vllm.entrypoints.serve.lora.protocol", "UnloadLoRAAdapterRequest"),
        ("vllm.entrypoints.openai.protocol", "UnloadLoRAAdapterRequest"),
    )
    return load, unload
