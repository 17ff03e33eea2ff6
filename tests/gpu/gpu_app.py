"""The Serve app of cluster-gpu.yaml on this host's GPUs, for the GPU tests.

Started once per test session like the CPU suite's app (tests/conftest.py: a local Ray head,
the config PUT to Serve's REST API), with the shipped GPU engine settings. What the tests
change, and why: a smaller `gpu_memory_utilization` so the X-LoRA replica and the parity
check's own engine fit beside the base replicas on one card; two adapter slots per replica
so that eviction shows with three adapters.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import yaml

from conftest import ADMIN_TOKEN, DECLARED, ROOT, ServeApp, _free_port, run_app

BASE = "smollm2-135m-instruct"
XLORA_NAME = "mix"
GPU_ADAPTERS = DECLARED  # three of the CPU suite's adapters (conftest.adapter_root)


def cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def needs_gpus(n: int) -> list[pytest.MarkDecorator]:
    have = cuda_devices()
    return [pytest.mark.gpu, pytest.mark.skipif(
        have < n, reason=f"needs {n} CUDA GPU(s), found {have}: run `make test-gpu` on a GPU host")]


def gpu_serve_config(args_update: dict[str, Any], http_port: int) -> dict[str, Any]:
    from ruvllm.config import resolve_cache_dir

    config = yaml.safe_load((ROOT / "cluster-gpu.yaml").read_text())
    (app,) = config["applications"]
    args = app["args"]
    for section, values in args_update.items():
        args[section] = ({**args.get(section, {}), **values} if isinstance(values, dict)
                         else values)
    args["cache_dir"] = str(resolve_cache_dir(None))
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    return config


def start_app(ray_head, args_update: dict[str, Any]) -> Iterator[ServeApp]:
    yield from run_app(ray_head, gpu_serve_config(args_update, _free_port()), "GPU Serve app")


@pytest.fixture(scope="session")
def one_gpu_app(ray_head, adapter_root, xlora_checkpoint) -> Iterator[ServeApp]:
    fraction = {"num_gpus": 0.4}  # base and mixture replicas share the one card
    yield from start_app(ray_head, {
        "engine": {"gpu_memory_utilization": 0.25, "max_loras": 2, "max_cpu_loras": 2,
                   "max_lora_rank": 8},
        "replicas": {"num_replicas": 1, **fraction},
        "adapters": {"allowed_roots": [str(adapter_root)],
                     "declared": {name: name for name in GPU_ADAPTERS},
                     "admin_token": ADMIN_TOKEN},
        "xlora": [{"name": XLORA_NAME, "checkpoint": str(xlora_checkpoint),
                   "replicas": {"num_replicas": 1, "num_cpus": 1, **fraction}}],
    })


@pytest.fixture(scope="session")
def two_gpu_app(ray_head) -> Iterator[ServeApp]:
    """cluster-gpu.yaml with two replicas: Ray must put them on two cards. (The admin
    token opens GET /v1/adapters, where ServeApp.engine_stats reads each replica's GPUs.)"""
    yield from start_app(ray_head, {"replicas": {"num_replicas": 2},
                                    "adapters": {"admin_token": ADMIN_TOKEN}})
