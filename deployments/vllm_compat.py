"""Import locations of the vLLM pieces ruvllm reuses.

GPU machines run vLLM 0.26 (pinned to their torch), the CPU build is 0.32, and several
OpenAI-layer modules moved in between. Everything version-dependent is imported here, newest
location first; `tests/test_vllm_compat.py` resolves every entry against the installed vLLM
(the CPU suite checks 0.32, `make test-gpu` checks the GPU host's release).
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


# 0.32: serve.engine.protocol; 0.26: openai.engine.protocol; older: openai.protocol.
_ENGINE_PROTOCOL_MODULES = (
    "vllm.entrypoints.serve.engine.protocol",
    "vllm.entrypoints.openai.engine.protocol",
    "vllm.entrypoints.openai.protocol",
)


def _engine_protocol(name: str) -> Any:
    return _first(*((module, name) for module in _ENGINE_PROTOCOL_MODULES))


def error_response_cls() -> Any:
    return _engine_protocol("ErrorResponse")


def model_list_classes() -> tuple[Any, Any]:
    return _engine_protocol("ModelCard"), _engine_protocol("ModelList")


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


def num_unfinished_requests(engine: Any) -> int:
    """Requests the engine front end still tracks. `AsyncLLM.get_num_unfinished_requests`
    exists in 0.32 but not 0.26; both keep the count on their output processor."""
    counter = getattr(engine, "get_num_unfinished_requests", None)
    if counter is None:
        counter = engine.output_processor.get_num_unfinished_requests
    return counter()


def engine_core_pids(engine: Any) -> list[int]:
    """The engine-core processes an `AsyncLLM` started (its MPClient's process manager;
    0.26 and 0.32 alike). Empty when vLLM runs the core in-process or as Ray actors."""
    resources = getattr(engine.engine_core, "resources", None)
    processes = getattr(getattr(resources, "engine_manager", None), "processes", None) or ()
    return [p.pid for p in processes if getattr(p, "pid", None)]


def cuda_w4a16_kernels() -> list[str]:
    """vLLM's 4-bit weight-only (mixed-precision) GEMM kernels on CUDA, by class name, in
    the order it tries them for a layer. The order is version-dependent (0.26 has
    AllSpark, 0.32 not), so it is read from the installed vLLM, never copied."""
    kernels = _first(
        ("vllm.model_executor.kernels.linear", "_POSSIBLE_KERNELS"),
        ("vllm.model_executor.layers.quantization.kernels.mixed_precision", "_POSSIBLE_KERNELS"),
    )
    from vllm.platforms import PlatformEnum

    return [k.__name__ for k in kernels[PlatformEnum.CUDA]]
