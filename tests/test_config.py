"""Config validation: one pydantic tree, errors name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, cluster_app_args
from ruvllm.config import AppConfig, ConfigError
from ruvllm.serve_config import load_app_configs


def test_cluster_yaml_is_a_valid_serve_config_with_two_replicas():
    configs = load_app_configs(ROOT / "cluster.yaml")
    config = configs["ruvllm"]
    assert config.replicas.num_replicas == 2
    assert config.model.source == "builtin:smollm2-135m-instruct"
    assert config.model.name == "smollm2-135m-instruct"
    assert config.engine.enable_prefix_caching


@pytest.mark.parametrize("args,field", [
    ({"engine": {"blok_size": 32}}, "engine.blok_size"),
    ({"engine": {"max_num_seqs": 0}}, "engine.max_num_seqs"),
    ({"engine": {"dtype": "int3"}}, "engine.dtype"),
    ({"engine": {"gpu_memory_utilization": 1.5}}, "engine.gpu_memory_utilization"),
    ({"replicas": {"num_replicas": "two"}}, "replicas.num_replicas"),
    ({"replicas": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "replicas.autoscaling"),
    ({"model": {"source": "builtin:gpt-17"}}, "model"),
    ({"model": {"source": "/no/such/dir"}}, "model"),
    ({"router": {"policy": "random"}}, "router.policy"),
    ({"engine": {"extra_engine_args": {"block_size": 64}}}, "engine"),
])
def test_invalid_config_names_the_field(args, field):
    with pytest.raises(ConfigError) as e:
        AppConfig.from_args(args)
    assert field in str(e.value)


def test_defaults_are_valid():
    config = AppConfig.from_args(None)
    assert config.engine.backend == "vllm"
    assert config.engine.max_model_len == 2048


def test_engine_args_rejected_by_vllm_fail_the_build_not_the_replica():
    from ruvllm.deployments.app import build_app

    args = cluster_app_args()
    args["engine"]["block_size"] = 16  # vLLM-CPU attention needs a multiple of 32
    with pytest.raises(ConfigError, match="engine.block_size"):
        build_app(args)
    args["engine"]["block_size"] = 32
    args["engine"]["extra_engine_args"] = {"no_such_vllm_arg": 1}
    with pytest.raises(ConfigError, match="no_such_vllm_arg"):
        build_app(args)
    args["engine"]["extra_engine_args"] = {}
    args["engine"]["max_model_len"] = 10**6  # beyond the model's 8k positions
    with pytest.raises(ConfigError, match="engine"):
        build_app(args)


def test_ruvllm_validate_cli(tmp_path: Path):
    ok = subprocess.run([sys.executable, "-m", "ruvllm.cli", "validate", str(ROOT / "cluster.yaml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout

    bad = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    bad["applications"][0]["args"]["replicas"]["num_cpus"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, "-m", "ruvllm.cli", "validate", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "replicas.num_cpus" in out.stderr


def test_gpu_config_is_the_cpu_app_with_gpu_engine_settings():
    """cluster-gpu.yaml (what `make serve` runs where nvidia-smi answers) differs from
    cluster.yaml only where a CUDA replica needs it, so the two cannot drift apart."""
    cpu = load_app_configs(ROOT / "cluster.yaml")["ruvllm"]
    gpu = load_app_configs(ROOT / "cluster-gpu.yaml")["ruvllm"]
    assert gpu.replicas.num_gpus == 1 and gpu.engine.dtype == "bfloat16"
    assert gpu.engine.block_size == 16 and not gpu.engine.enforce_eager
    assert gpu.engine.gpu_memory_utilization and gpu.engine.cpu_kvcache_space_gib is None
    for section in ("model", "router", "adapters", "placement", "admission"):
        assert getattr(gpu, section) == getattr(cpu, section), section
    assert gpu.engine.enable_lora == cpu.engine.enable_lora
    assert gpu.engine.max_lora_rank == cpu.engine.max_lora_rank


def test_make_picks_the_gpu_config_where_a_gpu_answers():
    def dry_run(*extra: str) -> str:
        return subprocess.run(["make", "-n", "serve", *extra], cwd=ROOT, capture_output=True,
                              text=True).stdout

    assert "serve run cluster-gpu.yaml" in dry_run("EXTRAS=gpu,test")
    assert "serve run cluster.yaml" in dry_run("EXTRAS=cpu,test,bench")
