"""The Serve app of cluster-gpu.yaml on this host's GPUs, for the GPU tests.

Started once per test session like the CPU suite's app (tests/conftest.py: a local Ray head,
the config PUT to Serve's REST API), with the shipped GPU engine settings. What the tests
change, and why: a smaller `gpu_memory_utilization` so the X-LoRA replica and the parity
check's own engine fit beside the base replicas on one card; two adapter slots per replica
so that eviction shows with three adapters.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
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


def _applications(url: str, headers: dict) -> dict:
    try:
        return httpx.get(url, headers=headers, timeout=30).json().get("applications") or {}
    except (httpx.HTTPError, ValueError):  # Serve restarting: ask again
        return {"?": None}


def delete_applications(app_head) -> None:
    """Every Serve application on the head, gone (a module with an app of its own needs
    the GPU the session's app holds)."""
    url = f"{app_head.dashboard_url}/api/serve/applications/"
    headers = app_head.auth_headers()
    if not _applications(url, headers):
        return
    r = httpx.delete(url, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while _applications(url, headers):
        assert time.monotonic() < deadline, "earlier Serve applications did not go away"
        time.sleep(2)


def ray_session_logs() -> Path:
    return Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "session_latest" / "logs"


def log_sizes() -> dict[Path, int]:
    """Where each of Ray's session log files ends now (`kernels_logged`'s `since`)."""
    return {f: f.stat().st_size for f in ray_session_logs().rglob("*") if f.is_file()}


def kernels_logged(pattern: re.Pattern, since: dict[Path, int] | None = None) -> dict[str, list[str]]:
    """vLLM logs the GEMM kernel it picked (`Using <kernel> for ...`) once per kernel in its
    engine process, whose output Ray keeps in the session's logs (the replica's
    worker-*.out/err): what `pattern`'s group matched there, with the files it is in. With
    `since` (from `log_sizes`), only in what each file gained after it."""
    found: dict[str, list[str]] = {}
    for log in (f for f in ray_session_logs().rglob("*") if f.suffix in (".out", ".err", ".log")):
        try:
            with log.open("rb") as handle:
                handle.seek((since or {}).get(log, 0))
                text = handle.read().decode(errors="replace")
        except OSError:
            continue
        for kernel in pattern.findall(text):
            found.setdefault(kernel, []).append(log.name)
    return found
