"""KubeRay manifests generated from `cluster.yaml`.

    ruvllm k8s render --profile gpu        # -> k8s/overlays/gpu/rayservice.yaml
    ruvllm k8s render --all                # every profile (what CI checks is committed)

A RayService's `serveConfigV2` is the same Serve config `serve run cluster.yaml` reads,
with a profile's overrides merged into the application args (GPU resources, autoscaling,
paths on the shared volume). It is generated, never edited by hand: a test renders every
profile and compares with the committed manifests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ruvllm.serve_config import APP_IMPORT_PATH, load_serve_config
from ruvllm.serve_mode import CPU_FLAGS, THROUGHPUT_FLAGS

CACHE_MOUNT = "/var/cache/ruvllm"
METRICS_PORT = 8080
RAY_VERSION = "2.60.0"


@dataclass(frozen=True)
class Profile:
    name: str
    image: str
    head_cpu: str
    head_memory: str
    worker_cpu: str
    worker_memory: str
    gpus_per_worker: int
    min_workers: int
    max_workers: int
    app_overrides: dict[str, Any] = field(default_factory=dict)
    serve_env: dict[str, str] = field(default_factory=dict)  # read when Ray starts


PROFILES = {
    # A laptop or CI-sized cluster: CPU workers, vLLM's CPU build, compiled engines.
    "cpu-dev": Profile(
        name="cpu-dev", image="ghcr.io/ruvllm/ruvllm-serve:0.1.0-cpu",
        head_cpu="2", head_memory="4Gi", worker_cpu="4", worker_memory="12Gi",
        gpus_per_worker=0, min_workers=1, max_workers=2, serve_env=CPU_FLAGS,
        app_overrides={"replicas": {"num_replicas": 2, "num_cpus": 2}},
    ),
    # Production: one engine replica per GPU, Serve autoscaling between 1 and 8 replicas
    # (target 32 ongoing requests = half of max_num_seqs 64, so a replica scales out
    # before its batch is full), the Ray autoscaler adding GPU workers to fit them.
    "gpu": Profile(
        name="gpu", image="ghcr.io/ruvllm/ruvllm-serve:0.1.0-cuda",
        head_cpu="4", head_memory="16Gi", worker_cpu="8", worker_memory="48Gi",
        gpus_per_worker=1, min_workers=1, max_workers=8,
        serve_env=THROUGHPUT_FLAGS,
        app_overrides={
            "engine": {"gpu_memory_utilization": 0.9, "cpu_kvcache_space_gib": None,
                       "cpu_threads_bind": "auto", "block_size": 16},
            "replicas": {"num_replicas": None, "num_cpus": 4, "num_gpus": 1, "autoscaling": {
                "min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 32,
                "upscale_delay_s": 30, "downscale_delay_s": 600}},
            "ingress": {"num_replicas": 2, "num_cpus": 1},
        },
    ),
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = copy.deepcopy(value)
    return out


def serve_config_v2(config_path: Path, profile: Profile) -> dict[str, Any]:
    raw = load_serve_config(config_path)
    # KubeRay owns the HTTP proxy's ports and placement; the Serve config keeps the apps.
    serve = {k: v for k, v in raw.items() if k not in ("http_options", "proxy_location")}
    apps = []
    for app in serve["applications"]:
        app = copy.deepcopy(app)
        if app.get("import_path") == APP_IMPORT_PATH:
            args = _merge(app.get("args") or {}, profile.app_overrides)
            args["cache_dir"] = CACHE_MOUNT
            args.setdefault("adapters", {})["allowed_roots"] = [f"{CACHE_MOUNT}/adapters"]
            app["args"] = args
        apps.append(app)
    serve["applications"] = apps
    return serve


# The head's well-known ports, named as KubeRay's services expect them.
HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001), ("serve", 8000))
SERVE_PORT = dict(HEAD_PORTS)["serve"]
DASHBOARD_PORT = dict(HEAD_PORTS)["dashboard"]

# The rayproject/ray images' own user: `ray`, uid 1000, primary group `users` (gid 100),
# which owns $HOME and /app (docker/Dockerfile.* copy the code there as `ray`).
RUN_AS_USER = 1000
RUN_AS_GROUP = 100

POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_GROUP,
    # The cache volume's files are group-owned by gid 100 and group-writable, so every pod
    # (head, workers, ISQ jobs) can publish models, adapters and the adapter registry there.
    "fsGroup": RUN_AS_GROUP,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    # Not read-only: Ray writes its session directory (/tmp/ray: sockets, logs, spilled
    # objects), and vLLM, torch.compile, Triton and Hugging Face write caches under $HOME
    # and /tmp. Making the root read-only needs emptyDir mounts for each of them, not
    # tried with the Ray image here (no cluster in CI), so it stays writable.
    "readOnlyRootFilesystem": False,
}


def _container(profile: Profile, name: str, cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    ports = [{"containerPort": METRICS_PORT, "name": "metrics"}]
    if name == "ray-head":
        ports = [{"containerPort": p, "name": n} for n, p in HEAD_PORTS] + ports
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {
        "name": name,
        "image": profile.image,
        "resources": {"limits": limits, "requests": dict(limits)},
        "env": [
            {"name": "RUVLLM_CACHE_DIR", "value": CACHE_MOUNT},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            # Engines are the workload; see the Makefile for why niceness 0.
            {"name": "RAY_worker_niceness", "value": "0"},
            *({"name": k, "value": v} for k, v in profile.serve_env.items()),
            {"name": "RUVLLM_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": "ruvllm-admin", "key": "token", "optional": True}}},
        ],
        "ports": ports,
        "volumeMounts": [{"name": "ruvllm-cache", "mountPath": CACHE_MOUNT}],
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }


def _pod(profile: Profile, name: str, cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [_container(profile, name, cpu, memory, gpus)],
        "volumes": [{"name": "ruvllm-cache",
                     "persistentVolumeClaim": {"claimName": "ruvllm-cache"}}],
    }
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                "effect": "NoSchedule"}]
    return {"metadata": {"labels": {"app.kubernetes.io/name": "ruvllm"}}, "spec": spec}


def render(config_path: Path, profile_name: str) -> dict[str, Any]:
    profile = PROFILES[profile_name]
    serve = serve_config_v2(config_path, profile)
    start_params = {"metrics-export-port": str(METRICS_PORT)}
    worker: dict[str, Any] = {
        "groupName": "gpu-workers" if profile.gpus_per_worker else "cpu-workers",
        "replicas": profile.min_workers,
        "minReplicas": profile.min_workers,
        "maxReplicas": profile.max_workers,
        "rayStartParams": dict(start_params),
        "template": _pod(profile, "ray-worker", profile.worker_cpu, profile.worker_memory,
                         profile.gpus_per_worker),
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "ruvllm", "labels": {"app.kubernetes.io/name": "ruvllm",
                                                   "ruvllm.io/profile": profile.name}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                # Ray 2.5x turns token auth on for new clusters; KubeRay then creates the
                # token Secret and uses it for its own calls (serve deploy, health).
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"idleTimeoutSeconds": 300, "upscalingMode": "Default"},
                "headGroupSpec": {
                    # No engines on the head: it runs the controllers and the HTTP proxy.
                    "rayStartParams": {**start_params, "num-cpus": "0",
                                       "dashboard-host": "0.0.0.0"},
                    "template": _pod(profile, "ray-head", profile.head_cpu,
                                     profile.head_memory, 0),
                },
                "workerGroupSpecs": [worker],
            },
        },
    }


def manifest_path(config_path: Path, profile_name: str) -> Path:
    """Where the rendered manifest of a profile lives, beside the config's `k8s/`."""
    return config_path.resolve().parent / "k8s" / "overlays" / profile_name / "rayservice.yaml"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as readable literal blocks."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def render_text(config_path: Path, profile_name: str) -> str:
    header = (f"# Generated by `ruvllm k8s render --profile {profile_name}` from "
              f"{config_path.name}; do not edit by hand.\n")
    return header + yaml.dump(render(config_path, profile_name), Dumper=_Dumper, sort_keys=False)
