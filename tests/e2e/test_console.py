"""What an operator's console shows (`serve run` prints the Ray workers' stdout and
stderr, which Ray also writes to `worker-*.out|err` in the session's log directory):
the ready line once, nothing per second while the app is idle, and the request log."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from ruvllm.deployments.readiness import READY_PREFIX

pytestmark = pytest.mark.e2e

IDLE_WINDOW_S = 8
QUIET_SPELL_S = 2
# vLLM's own throughput line (every VLLM_LOG_STATS_INTERVAL, 10 s): it goes quiet by
# itself one interval after an engine's last token, so a window right after another
# test's traffic may hold one per engine.
VLLM_INTERVAL_LINE = "Avg prompt throughput"


def _console_files() -> list[Path]:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return sorted(logs.glob("worker-*.out")) + sorted(logs.glob("worker-*.err"))


def _sizes() -> dict[Path, int]:
    return {path: path.stat().st_size for path in _console_files()}


def _lines_since(sizes: dict[Path, int]) -> list[str]:
    lines = []
    for path in _console_files():
        with path.open("rb") as f:
            f.seek(sizes.get(path, 0))
            lines += [f"{path.name}: {line}" for line in
                      f.read().decode(errors="replace").splitlines() if line.strip()]
    return lines


def test_the_ready_line_is_printed_once(serve_app):
    deadline = time.monotonic() + 10  # the ingress syncs once a second
    while True:
        ready = [line for line in _lines_since({}) if READY_PREFIX in line]
        if ready or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(ready) == 1, ready
    assert "'smollm2-135m-instruct' on 2 engine replica(s)" in ready[0]


def _new_lines(sizes: dict[Path, int]) -> list[str]:
    return [line for line in _lines_since(sizes) if VLLM_INTERVAL_LINE not in line]


def test_an_idle_app_prints_nothing_per_second(serve_app):
    """Before: Serve's access log line for each replica's `report` and each ingress's
    `sync` call to the placement controller, 5 lines a second with this app."""
    # Requests of the previous test may still be finishing (and logging): wait for a
    # quiet spell first, which a once-a-second line would never leave.
    deadline = time.monotonic() + 20
    sizes = _sizes()
    while time.monotonic() < deadline:
        time.sleep(QUIET_SPELL_S)
        if not _new_lines(sizes):
            break
        sizes = _sizes()
    sizes = _sizes()
    time.sleep(IDLE_WINDOW_S)
    assert _new_lines(sizes) == []


def test_a_request_is_still_logged(serve_app):
    sizes = _sizes()
    response = httpx.post(f"{serve_app.openai_url}/completions", timeout=60, json={
        "model": "smollm2-135m-instruct", "prompt": "Paris is", "max_tokens": 2})
    assert response.status_code == 200
    deadline = time.monotonic() + 10  # Ray's log files are flushed asynchronously
    while not any("/v1/completions" in line for line in _lines_since(sizes)):
        assert time.monotonic() < deadline, _lines_since(sizes)
        time.sleep(0.5)
