"""Every vLLM location ruvllm relies on resolves in the installed vLLM: 0.32 in the CPU
suite, the GPU host's release (0.26 on the lent H200s) under `make test-gpu`."""

from __future__ import annotations

import types

import pytest

from ruvllm.deployments import vllm_compat


@pytest.mark.parametrize("accessor", [
    vllm_compat.chat_request_cls, vllm_compat.completion_request_cls,
    vllm_compat.error_response_cls, vllm_compat.init_app_state,
])
def test_single_locations_resolve(accessor):
    assert callable(accessor())


def test_paired_locations_resolve():
    card, listing = vllm_compat.model_list_classes()
    assert listing(data=[card(id="m", root="m")]).data[0].id == "m"
    load, unload = vllm_compat.lora_admin_requests()
    assert load(lora_name="a", lora_path="/x").lora_name == "a"
    assert unload(lora_name="a").lora_name == "a"


def test_arg_parser_knows_the_engine_arguments_ruvllm_sets():
    args = vllm_compat.openai_arg_parser().parse_args(["--model", "m"])
    for name in ("dtype", "block_size", "gpu_memory_utilization", "enable_prefix_caching",
                 "max_model_len", "max_num_seqs", "enable_lora", "max_loras", "max_lora_rank",
                 "max_cpu_loras", "served_model_name"):
        assert hasattr(args, name), name


def test_unfinished_request_count_from_the_engine_or_its_output_processor():
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import OutputProcessor

    # Whichever this vLLM has, one of the two paths must exist.
    assert (hasattr(AsyncLLM, "get_num_unfinished_requests")
            or hasattr(OutputProcessor, "get_num_unfinished_requests"))
    newer = types.SimpleNamespace(get_num_unfinished_requests=lambda: 3)
    older = types.SimpleNamespace(output_processor=types.SimpleNamespace(
        get_num_unfinished_requests=lambda: 5))  # vLLM 0.26's AsyncLLM
    assert vllm_compat.num_unfinished_requests(newer) == 3
    assert vllm_compat.num_unfinished_requests(older) == 5


def test_first_falls_back_to_older_locations_and_names_every_miss():
    assert vllm_compat._first(("no.such.module", "X"), ("json", "dumps")) is __import__("json").dumps
    with pytest.raises(ImportError, match="no.such.module.X"):
        vllm_compat._first(("no.such.module", "X"), ("json", "no_such_attr"))


def test_cuda_w4a16_kernel_order_resolves():
    """engine.w4a16_kernel reads it (deployments/vllm_engine.py: w4a16_kernel_env)."""
    order = vllm_compat.cuda_w4a16_kernels()
    assert "MarlinLinearKernel" in order, order
    assert all(k.endswith("LinearKernel") for k in order), order
