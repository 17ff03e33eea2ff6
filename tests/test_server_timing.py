"""The Server-Timing header's arithmetic: phases partition the time before the reply."""

import time

from ruvllm.deployments.server_timing import RequestTimer, parse


def test_phases_partition_the_time_until_the_head():
    timer = RequestTimer()
    time.sleep(0.01)
    timer.mark_prepared()
    time.sleep(0.02)
    timer.mark_admitted()
    time.sleep(0.03)
    before = time.perf_counter()
    phases = parse(timer.header(replica_s=0.01))
    elapsed_ms = (time.perf_counter() - timer.started) * 1000
    assert list(phases) == ["ingress", "admission", "replica", "hop"]
    assert phases["ingress"] >= 10 and phases["admission"] >= 20
    assert phases["replica"] == 10.0 and phases["hop"] >= 20
    assert (before - timer.started) * 1000 <= sum(phases.values()) <= elapsed_ms + 0.01


def test_a_replica_time_beyond_the_dispatch_is_clamped_not_negative_hop():
    timer = RequestTimer()
    timer.mark_prepared()
    timer.mark_admitted()
    phases = parse(timer.header(replica_s=5.0))  # clocks of two processes disagree
    assert phases["hop"] == 0.0 and phases["replica"] < 5000


def test_parse_reads_other_servers_headers():
    assert parse('db;dur=53, app;desc="x";dur=47.2, cache;desc=hit') == {"db": 53.0, "app": 47.2}
