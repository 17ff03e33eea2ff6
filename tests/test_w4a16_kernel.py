"""`engine.w4a16_kernel`: a named 4-bit CUDA kernel becomes the engine replicas' environment
(every kernel vLLM would try before it disabled), checked against the installed vLLM's own
kernel order when the app is built. What vLLM then picks on a GPU is
tests/gpu/test_w4a16_kernel_gpu.py's."""

from __future__ import annotations

import pytest

from ruvllm.config import AppConfig, ConfigError
from ruvllm.deployments import vllm_compat
from ruvllm.deployments.app import _replica_options
from ruvllm.deployments.vllm_engine import build_vllm_args, w4a16_kernel_env


def _disabled(env: dict[str, str]) -> set[str]:
    return set(env["VLLM_DISABLED_KERNELS"].split(",")) - {""}


def test_each_kernel_disables_exactly_the_ones_vllm_tries_before_it():
    order = vllm_compat.cuda_w4a16_kernels()
    assert {"MarlinLinearKernel", "HummingLinearKernel"} <= set(order), order
    for i, kernel in enumerate(order):
        name = kernel.removesuffix("LinearKernel").lower()
        assert _disabled(w4a16_kernel_env(name)) == set(order[:i]), name
    assert w4a16_kernel_env("auto") == {}


def test_a_kernel_this_vllm_lacks_is_a_config_error_naming_the_ones_it_has():
    with pytest.raises(ConfigError, match=r"no 4-bit CUDA kernel 'turbo'.*marlin.*humming"):
        w4a16_kernel_env("turbo")
    # Another vLLM's order: the names come from it, not from a copy here.
    assert w4a16_kernel_env("b", ["ALinearKernel", "BLinearKernel"]) == {
        "VLLM_DISABLED_KERNELS": "ALinearKernel"}


def test_the_kernel_reaches_every_engine_deployment_beside_its_own_env():
    config = AppConfig.from_args({
        "engine": {"w4a16_kernel": " Humming "},
        "replicas": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}},
        "quantized": [{"name": "q", "isq": {"method": "rtn", "bits": 8},
                       "replicas": {"num_replicas": 1}}]})
    assert config.engine.w4a16_kernel == "humming"
    base = _replica_options(config)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert base["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "MarlinLinearKernel" in _disabled(base)
    assert "HummingLinearKernel" not in _disabled(base)
    variant = _replica_options(config, config.quantized[0].replicas, "ISQ-q")
    assert _disabled(variant["ray_actor_options"]["runtime_env"]["env_vars"]) == _disabled(base)
    # Serve takes them as they are.
    from ray import serve

    serve.deployment(lambda: None).options(**_replica_options(config))


def test_auto_leaves_the_environment_to_the_replicas_env():
    config = AppConfig.from_args({"replicas": {"env": {
        "VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}}})
    env = _replica_options(config)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env == {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}
    assert "runtime_env" not in _replica_options(AppConfig.from_args({}))["ray_actor_options"]


def test_two_ways_of_picking_kernels_at_once_are_refused():
    config = AppConfig.from_args({"engine": {"w4a16_kernel": "marlin"}, "replicas": {
        "env": {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}}})
    with pytest.raises(ConfigError, match="keep one"):
        _replica_options(config)


@pytest.mark.parametrize("engine, match", [
    ({"backend": "mistralrs", "w4a16_kernel": "marlin"}, "mistralrs has none"),
    ({"w4a16_kernel": "mar lin"}, "pattern"),
])
def test_a_kernel_setting_that_cannot_apply_is_refused_at_the_edge(engine, match):
    with pytest.raises(ConfigError, match=match):
        AppConfig.from_args({"engine": engine})


def test_it_is_not_passed_to_vllm_as_an_engine_argument(base_model_path):
    config = AppConfig.from_args({"engine": {"w4a16_kernel": "marlin"}})
    args = build_vllm_args(base_model_path, "m", config.engine)
    assert not hasattr(args, "w4a16_kernel")
