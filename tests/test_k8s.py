"""The Kubernetes manifests: generated (never hand-edited), valid against KubeRay's CRD
schemas (vendored in k8s/crds/, see its README; RUVLLM_KUBERAY_CRDS points elsewhere), with a
serveConfigV2 that Ray Serve's schema and this project's config model both accept."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from conftest import ROOT
from ruvllm.config import AppConfig
from ruvllm.k8s import PROFILES, manifest_path, render_text
from ruvllm.k8s_network import POLICY_PATH, network_policy_text

K8S = ROOT / "k8s"
VENDORED_CRDS = K8S / "crds"
CRD_DIR = Path(os.environ.get("RUVLLM_KUBERAY_CRDS", VENDORED_CRDS))
OTHER_KINDS = {"PersistentVolumeClaim", "PodMonitor", "Kustomization", "NetworkPolicy"}


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.is_relative_to(VENDORED_CRDS):  # the schemas themselves, not manifests
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def _strict(schema: Any) -> Any:
    """The CRD schema, rejecting unknown fields: Kubernetes silently prunes them, which
    would hide a typo such as `minReplica`."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_schemas() -> dict[str, dict[str, Any]]:
    if not CRD_DIR.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {CRD_DIR} (set RUVLLM_KUBERAY_CRDS)")
    return _load_crd_schemas()


@functools.cache
def _load_crd_schemas() -> dict[str, dict[str, Any]]:
    schemas = {}
    for path in CRD_DIR.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        kind = crd["spec"]["names"]["kind"]
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[kind] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_committed_manifest_is_the_rendered_one(profile):
    path = manifest_path(ROOT / "cluster.yaml", profile)
    assert path.read_text() == render_text(ROOT / "cluster.yaml", profile), (
        f"{path} is stale: run `ruvllm k8s render --all`")


def test_every_manifest_is_valid():
    schemas = _crd_schemas()
    kinds = []
    for path, doc in _manifests():
        kind = doc.get("kind")
        kinds.append(kind)
        if kind in schemas:
            errors = sorted(jsonschema.Draft7Validator(schemas[kind]).iter_errors(doc),
                            key=lambda e: list(e.path))
            assert not errors, f"{path}: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
        else:
            assert kind in OTHER_KINDS, f"{path}: unexpected kind {kind!r}"
        if kind == "Kustomization":
            for resource in doc.get("resources", []):
                assert (path.parent / resource).exists(), f"{path}: missing {resource}"
            for generator in doc.get("configMapGenerator", []):
                for file in generator.get("files", []):
                    assert (path.parent / file).is_file(), f"{path}: missing {file}"
    assert kinds.count("RayService") == len(PROFILES)


def test_crd_schema_catches_a_typo():
    schemas = _crd_schemas()
    doc = yaml.safe_load(manifest_path(ROOT / "cluster.yaml", "gpu").read_text())
    broken = copy.deepcopy(doc)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert list(jsonschema.Draft7Validator(schemas["RayService"]).iter_errors(broken))


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_serve_config_v2_passes_ray_and_our_schema(profile):
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(manifest_path(ROOT / "cluster.yaml", profile).read_text())
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    config = AppConfig.from_args(app["args"])
    assert str(config.cache_dir) == "/var/cache/ruvllm"
    if PROFILES[profile].gpus_per_worker:
        assert config.replicas.num_gpus == 1 and config.replicas.autoscaling is not None
        worker = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
        limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1
        head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]


def test_committed_dashboard_is_the_generated_one():
    from ruvllm.grafana import DASHBOARD_PATH, dashboard_text, metric_names

    path = ROOT.joinpath(*DASHBOARD_PATH)
    assert path.read_text() == dashboard_text(), f"{path} is stale: run `ruvllm k8s render --all`"
    names = metric_names()
    assert any(n.startswith("ray_ruvllm_admission") for n in names)
    assert any(n.startswith("ray_ruvllm_routing") for n in names)
    assert "ray_vllm_kv_cache_usage_perc" in names


def _pod_templates(profile: str) -> list[dict[str, Any]]:
    doc = yaml.safe_load(manifest_path(ROOT / "cluster.yaml", profile).read_text())
    cluster = doc["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"],
            *[group["template"] for group in cluster["workerGroupSpecs"]]]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_pod_runs_unprivileged(profile):
    for template in _pod_templates(profile):
        pod = template["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 1000
        assert pod["fsGroup"] == pod["runAsGroup"] == 100  # the Ray image's `users` group
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not template["spec"].get("hostNetwork") and not template["spec"].get("hostPID")
        for container in template["spec"]["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc.get("runAsUser", 1000) != 0
            # Ray and vLLM write under /tmp and $HOME (see core/k8s.py): explicit, not a default.
            assert sc["readOnlyRootFilesystem"] is False


def test_crd_schema_catches_a_security_context_typo():
    schemas = _crd_schemas()
    doc = yaml.safe_load(manifest_path(ROOT / "cluster.yaml", "gpu").read_text())
    broken = copy.deepcopy(doc)
    head = broken["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    head["securityContext"]["runAsNonRot"] = True
    assert list(jsonschema.Draft7Validator(schemas["RayService"]).iter_errors(broken))


def test_committed_network_policy_is_the_generated_one():
    path = ROOT.joinpath(*POLICY_PATH)
    assert path.read_text() == network_policy_text(), (
        f"{path} is stale: run `ruvllm k8s render --all`")
    kustomization = yaml.safe_load((path.parent / "kustomization.yaml").read_text())
    assert path.name in kustomization["resources"]


def _policy() -> dict[str, Any]:
    return yaml.safe_load(ROOT.joinpath(*POLICY_PATH).read_text())


def _check_selector(selector: dict[str, Any]) -> None:
    assert set(selector) <= {"matchLabels", "matchExpressions"}
    for key, value in selector.get("matchLabels", {}).items():
        assert isinstance(key, str) and isinstance(value, str)


def test_network_policy_is_well_formed_and_selects_every_ray_pod():
    """What kubeconform would check against networking.k8s.io/v1 (no schema vendored for
    it), plus that it selects the pods the RayService manifests create."""
    policy = _policy()
    assert "&id" not in ROOT.joinpath(*POLICY_PATH).read_text()  # plain YAML, no anchors
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    assert set(policy) == {"apiVersion", "kind", "metadata", "spec"}
    assert policy["metadata"]["name"] == "ruvllm"
    spec = policy["spec"]
    assert set(spec) <= {"podSelector", "policyTypes", "ingress", "egress"}
    assert spec["policyTypes"] == ["Ingress"]
    _check_selector(spec["podSelector"])
    for rule in spec["ingress"]:
        assert set(rule) <= {"from", "ports"} and rule
        for port in rule.get("ports", []):
            assert set(port) <= {"protocol", "port", "endPort"}
            assert port["protocol"] in ("TCP", "UDP", "SCTP")
            assert isinstance(port["port"], int) and 0 < port["port"] < 65536
        for peer in rule.get("from", []):
            assert peer and set(peer) <= {"podSelector", "namespaceSelector", "ipBlock"}
            for key in ("podSelector", "namespaceSelector"):
                if key in peer:
                    _check_selector(peer[key])
    wanted = spec["podSelector"]["matchLabels"]
    for profile in PROFILES:
        for template in _pod_templates(profile):
            labels = template["metadata"]["labels"]
            assert wanted.items() <= labels.items(), f"{profile}: a pod the policy misses"


# Sources of traffic: (labels, namespace) of a pod, or None for a client outside the
# cluster (through a load balancer or Ingress).
OUTSIDE = None
SAME_NAMESPACE_APP = ({"app": "web"}, "serving")
RAY_POD = ({"app.kubernetes.io/name": "ruvllm", "ray.io/node-type": "worker"}, "serving")
RAY_LABELLED_ELSEWHERE = ({"app.kubernetes.io/name": "ruvllm"}, "other")
OPERATOR = ({"app.kubernetes.io/name": "kuberay-operator"}, "kuberay-system")
PROMETHEUS = ({"app.kubernetes.io/name": "prometheus"}, "monitoring")
OTHER_NAMESPACE_APP = ({"app": "web"}, "other")


def _admits(policy: dict[str, Any], source, port: int, namespace: str = "serving") -> bool:
    """NetworkPolicy ingress semantics for one TCP connection to a selected pod: a rule
    admits when some peer of its `from` matches (none listed: every source) and some
    entry of its `ports` matches (none listed: every port)."""
    def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        assert "matchExpressions" not in selector  # not used; not modelled here
        return selector.get("matchLabels", {}).items() <= labels.items()

    def peer_matches(peer: dict[str, Any]) -> bool:
        if source is None or "ipBlock" in peer:
            return False  # no ipBlock is used; an outside client matches no pod peer
        labels, ns = source
        if "namespaceSelector" in peer:
            ns_ok = matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns})
        else:
            ns_ok = ns == namespace
        return ns_ok and matches(peer.get("podSelector", {}), labels)

    for rule in policy["spec"]["ingress"]:
        if "from" in rule and not any(peer_matches(p) for p in rule["from"]):
            continue
        if "ports" in rule and not any(p["port"] == port and p["protocol"] == "TCP"
                                       for p in rule["ports"]):
            continue
        return True
    return False


@pytest.mark.parametrize("source,open_ports", [
    (OUTSIDE, {8000}),
    (OTHER_NAMESPACE_APP, {8000}),
    (SAME_NAMESPACE_APP, {8000, 8265}),
    (OPERATOR, {8000, 8265}),
    (PROMETHEUS, {8000, 8080}),
    (RAY_LABELLED_ELSEWHERE, {8000}),  # a look-alike label in another namespace is not the cluster
    (RAY_POD, {8000, 8265, 8080, 6379, 10001, 52365, 10002, 19999}),
])
def test_network_policy_admits_serve_from_anywhere_and_the_rest_only_from_its_own(
        source, open_ports):
    policy = _policy()
    for port in (8000, 8265, 8080, 6379, 10001, 52365, 10002, 19999):
        assert _admits(policy, source, port) == (port in open_ports), (source, port)


def test_every_deployment_runs_serve_in_high_throughput_mode():
    """Ray reads these flags at start: the manifests and `make serve` set them (core/
    serve_mode.py says why); CPU ones keep Serve's console log on."""
    from ruvllm.serve_mode import CPU_FLAGS, THROUGHPUT_FLAGS, flags_for

    def env_of(profile: str) -> dict[str, str]:
        doc = yaml.safe_load((ROOT / "k8s" / "overlays" / profile / "rayservice.yaml").read_text())
        head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
        return {e["name"]: e.get("value") for e in head["containers"][0]["env"]}

    assert THROUGHPUT_FLAGS.items() <= env_of("gpu").items()
    assert "RAY_SERVE_LOG_TO_STDERR" not in env_of("gpu")
    assert CPU_FLAGS.items() <= env_of("cpu-dev").items()
    assert CPU_FLAGS["RAY_SERVE_LOG_TO_STDERR"] == "1"
    assert flags_for("cluster-gpu.yaml") == THROUGHPUT_FLAGS
    assert flags_for("cluster.yaml") == CPU_FLAGS
    makefile = (ROOT / "Makefile").read_text()
    for name, value in CPU_FLAGS.items():
        assert f"export {name} ?= {value}" in makefile


def test_gpu_profile_port_is_free_in_the_high_throughput_mode():
    """In that mode Serve binds 8404, 8500, 9101 and 9500 itself; an HAProxy frontend on one
    of them cannot start (a benchmark stack on 8500 failed so on an H200)."""
    from ruvllm.serve_mode import port_conflict

    for name in ("cluster.yaml", "cluster-gpu.yaml"):
        config = yaml.safe_load((ROOT / name).read_text())
        assert port_conflict(config["http_options"]["port"]) is None, name
    assert "fallback HTTP proxy" in port_conflict(8500)
