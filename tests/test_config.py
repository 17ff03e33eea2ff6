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
    from deployments.app import build_app

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
