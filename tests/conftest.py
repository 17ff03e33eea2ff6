"""Shared fixtures. The end-to-end ones start ONE Serve app per test session: the
application of `cluster.yaml` (2 vLLM-CPU replicas on the builtin model), with eager
engines so that it starts in seconds rather than minutes."""

from __future__ import annotations

import os
import socket
import subprocess
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
METERED_TENANT = "metered"  # 1000 predicted tokens per minute (tests/e2e/test_security.py)
DECLARED = ("alpha", "beta", "gamma")  # delta and epsilon get registered at run time
XLORA_NAME = "mix"
ISQ_NAME = "smollm2-gptq-w8a8"
# GPTQ (a calibrated method) at W8A8: the int8 kernels every x86 vLLM-CPU build has. A
# small calibration and held-out set keep the job short on 2 cores (it runs before the
# session app's replicas start, so every second of it is CI's).
ISQ_VARIANT = {"name": ISQ_NAME,
               "isq": {"method": "gptq", "bits": 8, "activation_bits": 8,
                       "calibration": {"samples": 16, "seq_len": 256},
                       # The out-of-distribution figure has its own test
                       # (test_isq_user_text.py); here it would only add minutes.
                       "evaluation": {"windows": 8, "seq_len": 256,
                                      "out_of_distribution": False},
                       "max_perplexity_increase": 0.25},
               "replicas": {"num_replicas": 1, "num_cpus": 0.25}}
# The second engine: ONE small mistral.rs deployment (1 replica) of the same base model,
# float32 like the vLLM replicas (mistral.rs's Q8_0 ISQ and the Q4_1 GGUF answer the
# Paris check wrongly on this model, measured), beside the vLLM ones. The client-visible
# checks of tests/e2e/test_openai_api.py run against both model names.
MISTRALRS_NAME = "smollm2-mistralrs"
MISTRALRS_VARIANT = {"name": MISTRALRS_NAME, "engine": {"backend": "mistralrs"},
                     "isq": {"as_is": True},
                     "replicas": {"num_replicas": 1, "num_cpus": 0.25}}
# (model name, deployment) of each backend's engines in the session app.
BACKENDS = {"vllm": ("smollm2-135m-instruct", "LLMReplica"),
            "mistralrs": (MISTRALRS_NAME, f"ISQ-{MISTRALRS_NAME}")}


def e2e_app_args(adapter_root: Path, xlora_checkpoint: Path) -> dict[str, Any]:
    """cluster.yaml's app, with eager engines (fast start), LoRA on, two adapter slots
    per replica (so eviction shows), and 16 sequences per engine: 32 in the cluster,
    well below the 100 sessions the admission test opens."""
    args = cluster_app_args()
    args["engine"] = {**args["engine"], "enforce_eager": True, "enable_lora": True,
                      "max_loras": 2, "max_cpu_loras": 2, "max_lora_rank": 8,
                      "max_num_seqs": 16}
    args["adapters"] = {"allowed_roots": [str(adapter_root)],
                        "declared": {name: name for name in DECLARED},
                        "admin_token": ADMIN_TOKEN,
                        # The session's own registry: names a past session registered or
                        # retired (in the shared cache dir) must not carry over.
                        "state_file": str(adapter_root.parent / "registry.json")}
    # A small default max_tokens keeps the test of requests that omit it short (every
    # other request names its max_tokens).
    args["admission"] = {**args.get("admission", {}), "max_queue": 16, "queue_timeout_s": 20,
                         "default_output_tokens": 16,
                         "tenants": {METERED_TENANT: {"tokens_per_minute": 1000}}}
    args["xlora"] = [{"name": XLORA_NAME, "checkpoint": str(xlora_checkpoint),
                      "replicas": {"num_replicas": 1, "num_cpus": 0.25}}]
    args["quantized"] = [ISQ_VARIANT, MISTRALRS_VARIANT]
    return args


def status_of(call) -> int | None:
    """The status of the ClientError `call()` raises, or None if it raises none."""
    from ruvllm.deployments.client_error import ClientError

    try:
        call()
    except ClientError as e:
        return e.status
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need no Ray cluster run first. The session's Serve app lives until the
    session ends, and its vLLM-CPU processes keep both cores busy polling: the X-LoRA
    parity test took 620 s when it came after the app and 210 s before it, and the whole
    fresh-clone CI run went from 36 to 24 minutes."""
    # Fault injection (tests/e2e/test_faults.py, marker `faults`) kills parts of the
    # shared app: it runs last, and restores what it killed before it ends.
    items.sort(key=lambda item: ("ray_head" in getattr(item, "fixturenames", ()),
                                 item.get_closest_marker("faults") is not None))


ADAPTERS = ("alpha", "beta", "gamma", "delta", "epsilon")


@pytest.fixture(scope="session")
def base_model_path() -> Path:
    from ruvllm.model_store import prepare_builtin

    return prepare_builtin("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory, base_model_path) -> Path:
    """Five small real peft LoRA adapters (random non-zero weights, rank 8) on the base."""
    from ruvllm.adapters.synthetic import make_lora_adapters

    root = tmp_path_factory.mktemp("adapters")
    make_lora_adapters(base_model_path, root, ADAPTERS, rank=8,
                       base_model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    return root


@pytest.fixture(scope="session")
def xlora_checkpoint(base_model_path) -> Path:
    """The three-expert X-LoRA fixture (trained once with peft, then cached)."""
    from ruvllm.adapters.xlora.fixture import build_fixture

    return build_fixture(base_model_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeApp:
    def __init__(self, base_url: str, app_name: str, config: Any, head: "RayHead",
                 serve_config: dict[str, Any]) -> None:
        self.head = head
        self.serve_config = serve_config
        self.base_url = base_url
        self.app_name = app_name
        self.config = config

    @property
    def openai_url(self) -> str:
        return f"{self.base_url}/v1"

    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN_TOKEN}"}

    def replica_ids(self) -> list[str]:
        import httpx

        described = httpx.get(f"{self.openai_url}/adapters", headers=self.admin_headers(),
                              timeout=30).json()
        # The X-LoRA mixture's and the quantized models' own replicas report too (their
        # model resident, no slots).
        return sorted(r["replica_id"] for r in described["replicas"]
                      if not {XLORA_NAME, ISQ_NAME, MISTRALRS_NAME} & set(r["resident"]))

    def ingress_log_lines(self) -> list[str]:
        """What the app's ingress replicas printed on stderr (Serve's log records and
        asyncio's alike), through Ray's log API."""
        from ray.util.state import get_log, list_actors

        prefix = f"SERVE_REPLICA::{self.app_name}#OpenAIIngress#"
        lines: list[str] = []
        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000):
            if (a.name or "").startswith(prefix):
                lines += "".join(get_log(actor_id=a.actor_id, suffix="err")).splitlines()
        return lines

    def engine_stats(self, replica_id: str) -> dict[str, Any]:
        """What an engine replica (of any deployment) says of its engine and adapters, as an
        operator reads it: its report to the placement controller, through the admin API
        (`GET /v1/adapters`), waiting for a report made after this call began (replicas
        report every `placement.report_period_s`)."""
        import httpx

        asked, deadline = time.time(), time.monotonic() + 30
        while True:
            described = httpx.get(f"{self.openai_url}/adapters", headers=self.admin_headers(),
                                  timeout=30).json()
            report = next((r for r in described["replicas"] if r["replica_id"] == replica_id
                           and r["reported_at"] > asked), None)
            if report is not None:
                return {**report["engine"], "replica_id": replica_id,
                        "adapters": report["resident"], "adapter_slots": report["slots"],
                        **{k: report[k] for k in ("loads", "plan_loads", "evictions", "hits",
                                                  "dedicated")}}
            assert time.monotonic() < deadline, f"no report from {replica_id}: {described}"
            time.sleep(0.2)

    def wait_idle(self, timeout_s: float = 60) -> None:
        """Until the base model's engines hold no request, and the routers have had that
        in a routing-stats report. A test that reads the router's balance starts here: a
        stream the test before closed mid-way can still be in its replica's last report
        (its abort and the next report each take a moment), and the router then rightly
        sends new work elsewhere."""
        deadline = time.monotonic() + timeout_s
        for replica_id in self.replica_ids():
            while (stats := self.engine_stats(replica_id))["unfinished"] > 0:
                assert time.monotonic() < deadline, f"engine never idle: {stats}"
                time.sleep(0.5)
        # Serve pulls the stats every period and then pushes them to each router.
        time.sleep(2.5 * self.config.router.stats_period_s)


class RayHead:
    """`ray start --head --block` in a subprocess: a local cluster like KubeRay's head pod
    (dashboard with Serve's REST API, Prometheus metrics on its own port)."""

    def __init__(self, tmp: Path) -> None:
        import sys

        self.gcs_port, self.dashboard_port, self.metrics_port = (_free_port() for _ in range(3))
        ray = Path(sys.executable).with_name("ray")
        if not ray.exists():  # a site tree on PYTHONPATH (the GPU hosts), its scripts on PATH
            import shutil

            ray = Path(shutil.which("ray") or ray)
        from ruvllm.serve_mode import CPU_FLAGS

        # Serve's mode as the cpu-dev manifests and `make serve` set it; the caller's
        # environment wins (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=0 for Serve's default mode).
        # No load balancer deregisters a local ingress: as `make serve`, no 30 s drain for
        # the apps a test replaces or removes; and on SIGTERM (the session's end) no
        # node drain, which Ray 2.60 waits out to its 30 s deadline with the app's
        # controller still holding the node (33 s of each run's teardown).
        env = {**CPU_FLAGS, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **os.environ,
               "HF_HUB_OFFLINE": "1", "RAY_worker_niceness": "0"}
        self.log = open(tmp / "ray-head.log", "w")
        self.process = subprocess.Popen(
            [str(ray), "start", "--head", "--block", "--disable-usage-stats",
             f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}",
             f"--metrics-export-port={self.metrics_port}"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def auth_headers(self) -> dict[str, str]:
        """Ray >= 2.5x turns token auth on for new clusters (token in ~/.ray/auth_token);
        the REST API then wants it, as `serve deploy` sends it."""
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available)
            from ray._private.authentication.http_token_authentication import (
                get_auth_headers_if_auth_enabled)

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
            return dict(get_auth_headers_if_auth_enabled({}))
        except ImportError:  # older Ray: no token auth
            return {}

    def wait_for_dashboard(self, timeout_s: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited {self.process.returncode}; "
                                   f"see {self.log.name}")
            try:
                status = httpx.get(f"{self.dashboard_url}/api/serve/applications/",
                                   headers=self.auth_headers(), timeout=5).status_code
                if status == 200:
                    return
                if status in (401, 403):
                    raise RuntimeError(f"Ray dashboard refused the test's token ({status})")
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError("the Ray dashboard did not come up")

    def stop(self) -> None:
        self.process.terminate()  # `--block` stops the whole local cluster on SIGTERM
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        # Unlike `ray stop`, SIGTERM leaves Ray's "current cluster" file behind, and a later
        # `serve run` (make serve) would try to join this dead cluster.
        import tempfile

        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        try:
            if current.read_text().strip().endswith(f":{self.gcs_port}"):
                current.unlink()
        except OSError:
            pass


def kuberay_serve_config(args: dict[str, Any], http_port: int) -> dict[str, Any]:
    """What KubeRay would submit for the cpu-dev profile (the generated serveConfigV2),
    with the test's engine/adapter settings and local paths merged into the app's args,
    and the HTTP options KubeRay would set on the head."""
    from ruvllm.k8s import PROFILES, serve_config_v2

    serve_config = serve_config_v2(ROOT / "cluster.yaml", PROFILES["cpu-dev"])
    (app,) = serve_config["applications"]
    from ruvllm.config import resolve_cache_dir

    app["args"] = {**app["args"], "cache_dir": str(resolve_cache_dir(None)), **args}
    serve_config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    return serve_config


def deploy_and_wait(head: RayHead, serve_config: dict[str, Any], timeout_s: float = 900) -> None:
    """PUT the config to Serve's REST API (KubeRay's path) and wait for RUNNING."""
    import httpx

    url = f"{head.dashboard_url}/api/serve/applications/"
    headers = head.auth_headers()
    response = httpx.put(url, json=serve_config, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    names = [a["name"] for a in serve_config["applications"]]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = (httpx.get(url, headers=headers, timeout=30).json().get("applications") or {})
        statuses = {n: (apps.get(n) or {}).get("status") for n in names}
        if all(s == "RUNNING" for s in statuses.values()):
            return
        for n, s in statuses.items():
            if s == "DEPLOY_FAILED":
                raise RuntimeError(f"{n}: {apps[n].get('message')}")
        time.sleep(2)
    raise TimeoutError(f"applications not RUNNING after {timeout_s} s: {statuses}")


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> Iterator[RayHead]:
    head = RayHead(tmp_path_factory.mktemp("ray"))
    try:
        head.wait_for_dashboard()
        yield head
    finally:
        head.stop()


def run_app(ray_head: RayHead, serve_config: dict[str, Any], what: str) -> Iterator[ServeApp]:
    """Deploy `serve_config` on the session's Ray head, yield it as a ServeApp, and hold a
    driver connection for deployment handles (replica stats) while it is in use. An app of
    the same name deployed again replaces the one before (the GPU tests do that)."""
    import ray

    from ruvllm.config import AppConfig

    started = time.monotonic()
    deploy_and_wait(ray_head, serve_config)
    port = serve_config["http_options"]["port"]
    print(f"\n{what} up in {time.monotonic() - started:.0f} s on port {port}")
    ray.init(address=ray_head.address, log_to_driver=bool(os.environ.get("RUVLLM_TEST_LOGS")),
             ignore_reinit_error=True)
    try:
        (app,) = serve_config["applications"]
        yield ServeApp(f"http://127.0.0.1:{port}", "ruvllm", AppConfig.from_args(app["args"]),
                       ray_head, serve_config)
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_app(ray_head: RayHead, adapter_root: Path, xlora_checkpoint: Path) -> Iterator[ServeApp]:
    serve_config = kuberay_serve_config(e2e_app_args(adapter_root, xlora_checkpoint), _free_port())
    yield from run_app(ray_head, serve_config, "Serve app")


@pytest.fixture(scope="session")
def openai_client(serve_app: ServeApp):
    import openai

    return openai.OpenAI(base_url=serve_app.openai_url, api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture
def async_openai_client(serve_app: ServeApp):
    """One per test: its connection pool belongs to the event loop of the test's
    asyncio.run, and a pool reused from a closed loop fails ('Event loop is closed')."""
    import openai

    return openai.AsyncOpenAI(base_url=serve_app.openai_url, api_key="unused",
                              max_retries=0, timeout=300)
