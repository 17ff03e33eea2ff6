"""The placement controller's adapter registry across controller restarts (no Ray
cluster: the controller class is plain Python, and the ingress's ClusterView syncs with it
through a stand-in for the deployment handle), against real peft adapters and the real
base checkpoint."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ruvllm.adapters.registry import AdapterError
from ruvllm.adapters.registry_store import RegistryStore
from ruvllm.deployments.cluster_view import ClusterView
from ruvllm.deployments.controller import PlacementController
from ruvllm.config import AppConfig


@pytest.fixture
def root(tmp_path, adapter_root) -> Path:
    root = tmp_path / "adapters"
    for name in ("alpha", "beta", "delta", "epsilon"):
        shutil.copytree(adapter_root / name, root / name)
    return root


@pytest.fixture
def config(tmp_path, root) -> AppConfig:
    return AppConfig.from_args({
        "engine": {"enable_lora": True, "max_lora_rank": 8},
        "adapters": {"allowed_roots": [str(root)], "declared": {"alpha": "alpha", "beta": "beta"},
                     "state_file": str(tmp_path / "state" / "registry.json")}})


@pytest.fixture
def errors():
    """Error lines the controller logs (Ray's loggers do not propagate to caplog's)."""
    lines: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def adapters(controller: PlacementController) -> list[str]:
    return [a["name"] for a in controller.describe()["adapters"]]


class _Method:
    def __init__(self, handle: "LocalHandle", name: str) -> None:
        self._handle, self._name = handle, name

    async def remote(self, *args):
        return getattr(self._handle.controller, self._name)(*args)


class LocalHandle:
    """What ClusterView calls on a DeploymentHandle (`handle.sync.remote(...)`), answered
    by whichever controller instance is current: a restart swaps it."""

    def __init__(self, controller: PlacementController) -> None:
        self.controller = controller
        self.sync = _Method(self, "sync")


def ingress_view(handle: LocalHandle) -> ClusterView:
    return ClusterView(handle, period_s=1.0, on_capacity=lambda *_: None)


def test_runtime_registrations_and_deletions_survive_a_restart(config):
    first = PlacementController(config)
    assert first.register_adapter("delta", "delta").name == "delta"
    assert first.unregister_adapter("beta").name == "beta"
    assert adapters(first) == ["alpha", "delta"]

    restarted = PlacementController(config)
    # delta (registered at run time) is back; beta, deleted at run time, is declared in
    # the config and so comes back too.
    assert adapters(restarted) == ["alpha", "beta", "delta"]
    assert restarted.unregister_adapter("delta").name == "delta"
    assert adapters(PlacementController(config)) == ["alpha", "beta"]


def test_a_stale_ingress_refetches_after_a_restart(config):
    """The ingress keeps the version it last saw; the restarted controller's counter must
    not land on it with other adapters (before: it restarted from the declared count)."""
    handle = LocalHandle(PlacementController(config))
    view = ingress_view(handle)
    assert handle.controller.register_adapter("delta", "delta").name == "delta"
    asyncio.run(view.sync())
    assert sorted(view.adapters) == ["alpha", "beta", "delta"]
    seen = handle.controller.sync({}, -1)["version"]

    handle.controller = PlacementController(config)  # Serve restarted the controller
    assert handle.controller.sync({}, -1)["version"] > seen
    assert handle.controller.unregister_adapter("delta").name == "delta"
    assert handle.controller.register_adapter("epsilon", "epsilon").name == "epsilon"
    asyncio.run(view.sync())
    assert sorted(view.adapters) == ["alpha", "beta", "epsilon"]


def test_every_restart_moves_the_version_forward_even_without_changes(config):
    versions = [PlacementController(config).sync({}, -1)["version"] for _ in range(3)]
    assert versions == sorted(set(versions))


def test_a_declared_adapter_gone_bad_is_left_out_and_logged(config, root, errors):
    shutil.rmtree(root / "beta")
    controller = PlacementController(config)  # before: AdapterError, no controller
    assert adapters(controller) == ["alpha"]
    assert any("beta" in line and "does not exist" in line for line in errors)
    assert controller.sync({}, -1)["adapters"].keys() == {"alpha"}


def test_a_runtime_adapter_rewritten_while_down_is_refused_and_its_name_kept(
        config, root, errors):
    first = PlacementController(config)
    assert first.register_adapter("delta", "delta").name == "delta"
    weights = root / "delta" / "adapter_model.safetensors"
    shutil.copyfile(root / "epsilon" / "adapter_model.safetensors", weights)

    restarted = PlacementController(config)
    assert adapters(restarted) == ["alpha", "beta"]
    assert any("delta" in line and "other weights" in line for line in errors)
    # Replicas may still hold the old delta: the name cannot come back with these.
    refused = restarted.register_adapter("delta", "delta")
    assert isinstance(refused, AdapterError) and refused.status == 409
    assert restarted.register_adapter("delta2", "delta").name == "delta2"


def test_a_retired_name_stays_retired_across_a_restart(config):
    first = PlacementController(config)
    assert first.register_adapter("reused", "delta").name == "reused"
    assert first.unregister_adapter("reused").name == "reused"
    restarted = PlacementController(config)
    refused = restarted.register_adapter("reused", "epsilon")
    assert isinstance(refused, AdapterError) and refused.status == 409
    assert restarted.register_adapter("reused", "delta").name == "reused"


def test_a_change_that_cannot_be_saved_is_undone_and_answered_503(config, monkeypatch):
    controller = PlacementController(config)

    def disk_full(state):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(controller._store, "save", disk_full)
    failed = controller.register_adapter("delta", "delta")
    assert isinstance(failed, AdapterError) and failed.status == 503
    failed = controller.unregister_adapter("alpha")
    assert isinstance(failed, AdapterError) and failed.status == 503
    assert adapters(controller) == ["alpha", "beta"]
    monkeypatch.undo()
    assert adapters(PlacementController(config)) == ["alpha", "beta"]


def test_an_unreadable_state_file_is_moved_aside_and_the_version_jumps(config, errors):
    first = PlacementController(config)
    assert first.register_adapter("delta", "delta").name == "delta"
    seen = first.sync({}, -1)["version"]
    path = config.registry_state_file
    path.write_text("{not json")
    restarted = PlacementController(config)
    assert adapters(restarted) == ["alpha", "beta"]
    assert restarted.sync({}, -1)["version"] > seen + 1_000_000
    assert [p.name.split(".bad-")[0] for p in path.parent.glob("*.bad-*")] == [path.name]
    assert any("is damaged" in line for line in errors)


def test_the_state_file_is_whole_json_with_the_version_and_fingerprints(config):
    controller = PlacementController(config)
    assert controller.register_adapter("delta", "delta").name == "delta"
    data = json.loads(config.registry_state_file.read_text())
    assert data["version"] == controller.sync({}, -1)["version"]
    assert sorted(data["adapters"]) == ["alpha", "beta", "delta"]
    state = RegistryStore(config.registry_state_file).load()
    assert state.adapters["delta"].fingerprint[0] == state.adapters["delta"].path
    assert [p.name for p in config.registry_state_file.parent.iterdir()] == ["registry.json"]


def test_the_default_state_file_is_under_the_cache_dir_per_app(tmp_path):
    config = AppConfig.from_args({"name": "../a b", "cache_dir": str(tmp_path)})
    assert config.registry_state_file == tmp_path / "registry" / "_a_b.json"


def test_concurrent_changes_are_saved_as_made(config):
    """Serve calls the controller's sync methods from a thread pool: whatever order the
    changes land in, the saved registry is the live one."""
    controller = PlacementController(config)

    def churn(i: int) -> None:
        for round_ in range(5):
            name = f"t{i}-{round_}"
            assert controller.register_adapter(name, "delta" if i % 2 else "epsilon").name == name
            if round_ % 2:
                assert controller.unregister_adapter(name).name == name

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(churn, range(8)))
    live = adapters(controller)
    assert len(live) == 2 + 8 * 3
    assert adapters(PlacementController(config)) == live


def test_a_state_file_that_cannot_be_written_does_not_stop_the_controller(
        config, monkeypatch, errors):
    seen = PlacementController(config).sync({}, -1)["version"]

    def read_only(self, state):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(RegistryStore, "save", read_only)
    controller = PlacementController(config)
    assert adapters(controller) == ["alpha", "beta"]  # serving, declared adapters there
    assert controller.sync({}, -1)["version"] > seen + 1_000_000  # never saved: off the count
    refused = controller.register_adapter("delta", "delta")
    assert isinstance(refused, AdapterError) and refused.status == 503
    assert any("could not save" in line for line in errors)


def test_ingresses_get_capacity_shares_by_the_tenants_they_serve(config):
    """The controller splits the engines between ingress views by their tenants' demand
    (weighted, router/capacity_shares.py), through the same sync that carries adapters."""
    from ruvllm.adapters.placement import ReplicaReport
    import time

    weighted = config.model_copy(update={"admission": config.admission.model_copy(update={
        "tenants": {"gold": {"weight": 3.0}, "free": {"weight": 1.0}}})})
    dumped = weighted.model_dump()
    dumped["placement"]["report_period_s"] = 0.05
    weighted = AppConfig.model_validate(dumped)
    controller = PlacementController(weighted)
    time.sleep(1.2)  # past a new controller's warm-up (2 report periods + 1 s)
    controller.report(ReplicaReport("r0", [], 4, 0.0, kv_capacity_tokens=8000, max_num_seqs=8))
    handle = LocalHandle(controller)
    seen: dict[str, list] = {"gold": [], "free": []}
    views = {t: ClusterView(handle, period_s=1.0,
                            on_capacity=lambda model, kv, seqs, t=t: seen[t].append(kv),
                            tenant_demand=lambda t=t: {t: (100_000, 100)})
             for t in seen}

    async def scenario():
        for _ in range(2):  # the first ingress to sync is alone until the second has
            for view in views.values():
                await view.sync()

    asyncio.run(scenario())
    assert views["gold"].capacity_share == pytest.approx(0.75)
    assert views["free"].capacity_share == pytest.approx(0.25)
    assert seen["gold"][-1] == 8000 and views["gold"].ingress_id != views["free"].ingress_id

def test_a_restarted_controller_does_not_zero_the_ingress_capacity(tmp_path, root):
    """Right after Serve restarts the controller no replica has reported to it yet: an
    ingress that took its count (0) would admit nothing and fail /health until its next
    sync (before: it did). It keeps the last count until the replicas had time to report."""
    import time

    from ruvllm.adapters.placement import ReplicaReport

    config = AppConfig.from_args({
        "engine": {"enable_lora": True, "max_lora_rank": 8},
        "placement": {"report_period_s": 0.05},
        "adapters": {"allowed_roots": [str(root)], "declared": {"alpha": "alpha"},
                     "state_file": str(tmp_path / "registry.json")}})
    report = ReplicaReport(replica_id="r1", resident=[], slots=2, queued_tokens=0,
                           kv_capacity_tokens=4096, max_num_seqs=16)
    seen: list[int] = []
    handle = LocalHandle(PlacementController(config))
    view = ClusterView(handle, period_s=1.0, on_capacity=lambda model, kv, seqs: seen.append(kv))
    time.sleep(1.2)  # past the first controller's own warm-up (2 periods + 1 s)
    handle.controller.report(report)
    asyncio.run(view.sync())
    assert seen == [4096]

    handle.controller = PlacementController(config)  # Serve restarted the controller
    asyncio.run(view.sync())
    assert seen == [4096] and sorted(view.adapters) == ["alpha"]
    time.sleep(1.2)
    handle.controller.report(report)
    asyncio.run(view.sync())
    assert seen == [4096, 4096]
    # Past its warm-up a controller that heard from no engine means it: 0 is taken.
    handle.controller = PlacementController(config)
    time.sleep(1.2)
    asyncio.run(view.sync())
    assert seen == [4096, 4096, 0]


def test_a_declared_adapter_with_new_weights_is_served_after_a_restart(config, root, errors):
    """The config names the declared adapters: rebuilt weights under a declared name, or
    the name pointed at another directory, are what a redeployed app serves (before: the
    saved state retired the name and the adapter was left out, 404)."""
    first = PlacementController(config)
    assert adapters(first) == ["alpha", "beta"]
    shutil.copyfile(root / "epsilon" / "adapter_model.safetensors",
                    root / "alpha" / "adapter_model.safetensors")
    moved = config.model_copy(deep=True)
    moved.adapters.declared["beta"] = "delta"
    restarted = PlacementController(moved)
    assert adapters(restarted) == ["alpha", "beta"]
    assert restarted.describe()["adapters"][1]["path"].endswith("delta")
    assert not errors
