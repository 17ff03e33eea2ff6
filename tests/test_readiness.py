"""The ready line: printed once, when every engine the config asks for has reported."""

from __future__ import annotations

from conftest import cluster_app_args
from ruvllm.deployments.readiness import READY_PREFIX, ReadyAnnouncement, announce, health
from ruvllm.adapters.placement import ReplicaReport
from ruvllm.config import AppConfig


def _report(replica_id: str, dedicated: str | None = None) -> ReplicaReport:
    return ReplicaReport(replica_id=replica_id, resident=[], slots=8, queued_tokens=0,
                         kv_capacity_tokens=23296, max_num_seqs=64, dedicated=dedicated)


def test_cluster_yaml_is_ready_when_both_engines_report_and_says_so_once():
    ready = ReadyAnnouncement.for_config(AppConfig.from_args(cluster_app_args()))
    assert ready.expected == {None: 2}
    assert ready.line([]) is None
    assert ready.line([_report("a")]) is None
    line = ready.line([_report("a"), _report("b")])
    assert line == (f"{READY_PREFIX} 'smollm2-135m-instruct' on 2 engine replica(s); "
                    "OpenAI API at /v1")
    assert ready.line([_report("a"), _report("b")]) is None


def test_dedicated_models_and_autoscaling_count_too():
    args = cluster_app_args()
    args["replicas"] = {"autoscaling": {"min_replicas": 1, "max_replicas": 4,
                                        "initial_replicas": 2}}
    args["quantized"] = [{"name": "q8", "isq": {"method": "rtn", "bits": 8},
                          "replicas": {"num_replicas": 1}}]
    ready = ReadyAnnouncement.for_config(AppConfig.from_args(args))
    assert ready.expected == {None: 2, "q8": 1}
    assert ready.line([_report("a"), _report("b")]) is None  # the quantized one is missing
    line = ready.line([_report("a"), _report("b"), _report("c", dedicated="q8")])
    assert line is not None and line.endswith(
        "'smollm2-135m-instruct' on 2 engine replica(s), 'q8' on 1; OpenAI API at /v1")


def test_health_is_503_until_a_base_engine_reports_capacity_and_names_each_model():
    status, body = health("base", {}, ["xl"])
    assert status == 503 and body == {"status": "starting",
                                      "models": {"base": "starting", "xl": "starting"}}
    status, body = health("base", {None: 23296}, ["xl"])
    assert status == 200 and body == {"status": "ok", "models": {"base": "ready", "xl": "starting"}}
    assert health("base", {None: 23296, "xl": 1000}, ["xl"])[1]["models"]["xl"] == "ready"
    # Every base engine gone: capacity reported as 0, traffic should stop coming.
    assert health("base", {None: 0, "xl": 1000}, ["xl"])[0] == 503


def test_the_ready_line_reaches_the_log_file_when_serve_buffers_records(tmp_path):
    """As Serve's high-throughput mode configures a replica's logger: records buffered in a
    MemoryHandler (1,000 of them, flushed early only on ERROR) in front of the file."""
    import logging.handlers

    logfile = tmp_path / "controller.log"
    target = logging.FileHandler(logfile)
    buffered = logging.handlers.MemoryHandler(1000, flushLevel=logging.ERROR, target=target)
    logger = logging.getLogger("test_readiness.buffered")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(buffered)
    try:
        logger.info("an earlier record")
        announce(logger, f"{READY_PREFIX} 'm' on 1 engine replica(s); OpenAI API at /v1")
        assert READY_PREFIX in logfile.read_text()
    finally:
        logger.removeHandler(buffered)
        buffered.close()
