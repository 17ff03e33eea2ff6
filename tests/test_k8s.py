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

K8S = ROOT / "k8s"
VENDORED_CRDS = K8S / "crds"
CRD_DIR = Path(os.environ.get("RUVLLM_KUBERAY_CRDS", VENDORED_CRDS))
OTHER_KINDS = {"PersistentVolumeClaim", "PodMonitor", "Kustomization"}


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
