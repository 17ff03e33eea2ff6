"""Shared fixtures. The end-to-end ones start ONE Serve app per test session: the
application of `cluster.yaml` (2 vLLM-CPU replicas on the builtin model), with eager
engines so that it starts in seconds rather than minutes."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cluster_app_args() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    (app,) = [a for a in config["applications"] if a["name"] == "ruvllm"]
    return app["args"]


ADMIN_TOKEN = "test-admin-token"
DECLARED = ("alpha", "beta", "gamma")  # delta and epsilon get registered at run time


def e2e_app_args(adapter_root: Path) -> dict[str, Any]:
    """cluster.yaml's app, with eager engines (fast start), LoRA on, two adapter slots
    per replica (so eviction shows), and 16 sequences per engine: 32 in the cluster,
    well below the 100 sessions the admission test opens."""
    args = cluster_app_args()
    args["engine"] = {**args["engine"], "enforce_eager": True, "enable_lora": True,
                      "max_loras": 2, "max_cpu_loras": 2, "max_lora_rank": 8,
                      "max_num_seqs": 16}
    args["adapters"] = {"allowed_roots": [str(adapter_root)],
                        "declared": {name: name for name in DECLARED},
                        "admin_token": ADMIN_TOKEN}
    args["admission"] = {**args.get("admission", {}), "max_queue": 16, "queue_timeout_s": 20}
    return args


ADAPTERS = ("alpha", "beta", "gamma", "delta", "epsilon")


@pytest.fixture(scope="session")
def base_model_path() -> Path:
    from ruvllm.model_store import prepare_builtin

    return prepare_builtin("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory, base_model_path) -> Path:
    """Five small real peft LoRA adapters (random non-zero weights, rank 8) on the base."""
    from adapters.synthetic import make_lora_adapters

    root = tmp_path_factory.mktemp("adapters")
    make_lora_adapters(base_model_path, root, ADAPTERS, rank=8,
                       base_model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeApp:
    def __init__(self, base_url: str, app_name: str, config: Any) -> None:
        self.base_url = base_url
        self.app_name = app_name
        self.config = config

    @property
    def openai_url(self) -> str:
        return f"{self.base_url}/v1"

    def replica_handle(self):
        from ray import serve

        return serve.get_deployment_handle("LLMReplica", app_name=self.app_name)

    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN_TOKEN}"}

    def replica_ids(self) -> list[str]:
        import httpx

        described = httpx.get(f"{self.openai_url}/adapters", headers=self.admin_headers(),
                              timeout=30).json()
        return sorted(r["replica_id"] for r in described["replicas"])

    def engine_stats(self, replica_id: str) -> dict[str, Any]:
        from router.hints import RoutingHints

        response = self.replica_handle().engine_stats.remote(
            hints=RoutingHints(replica_id=replica_id))
        return response.result(timeout_s=30)


@pytest.fixture(scope="session")
def serve_app(adapter_root: Path) -> Iterator[ServeApp]:
    import ray
    from ray import serve

    from deployments.app import build_app
    from ruvllm.config import AppConfig

    port = _free_port()
    ray.init(runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}}, include_dashboard=False,
             log_to_driver=bool(os.environ.get("RUVLLM_TEST_LOGS")))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = e2e_app_args(adapter_root)
    started = time.monotonic()
    serve.run(build_app(args), name="ruvllm", route_prefix="/")
    print(f"\nServe app up in {time.monotonic() - started:.0f} s on port {port}")
    try:
        yield ServeApp(f"http://127.0.0.1:{port}", "ruvllm", AppConfig.from_args(args))
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def openai_client(serve_app: ServeApp):
    import openai

    return openai.OpenAI(base_url=serve_app.openai_url, api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="session")
def async_openai_client(serve_app: ServeApp):
    import openai

    return openai.AsyncOpenAI(base_url=serve_app.openai_url, api_key="unused",
                              max_retries=0, timeout=300)
