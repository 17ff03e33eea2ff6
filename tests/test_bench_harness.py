"""The benchmark harness measures a stack only once every engine replica is up."""

import os
import subprocess
import sys
import threading
import time

import pytest

from benchmarks.harness import wait_for_ready_line
from ruvllm.deployments.readiness import READY_PREFIX


def _sleeper(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_waits_for_the_ready_line_not_the_first_replica(tmp_path):
    log = tmp_path / "stack.log"
    log.write_text("(LLMReplica pid=1) engine 1 of 2 ready\n")
    proc = _sleeper(30)

    def second_engine_reports() -> None:
        time.sleep(1.5)
        with log.open("a") as f:
            f.write(f"(PlacementController pid=2) {READY_PREFIX} 'm' on 2 engine replica(s)\n")

    threading.Thread(target=second_engine_reports).start()
    try:
        assert wait_for_ready_line(log, proc, 20, "stack") >= 1.0
    finally:
        proc.kill()


def test_a_stack_that_exits_before_its_ready_line_is_an_error(tmp_path):
    log = tmp_path / "stack.log"
    log.write_text("")
    proc = _sleeper(0)
    proc.wait()
    with pytest.raises(RuntimeError, match="exited"):
        wait_for_ready_line(log, proc, 20, "stack")


def test_finds_the_ready_line_in_serve_log_files_when_the_console_has_none(tmp_path, monkeypatch):
    """Ray Serve's high-throughput mode logs only to files: the harness reads those too."""
    import tempfile

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    serve_logs = tmp_path / "ray" / "session_latest" / "logs" / "serve"
    serve_logs.mkdir(parents=True)
    stale = serve_logs / "controller_0.log"  # an earlier session's ready line must not count
    stale.write_text(f"INFO {READY_PREFIX} 'm' on 1 engine replica(s)\n")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    console = tmp_path / "stack.log"
    console.write_text("Throughput optimized Ray Serve enabled\n  • Log to stderr disabled\n")
    since = time.time()
    proc = _sleeper(30)
    try:
        with pytest.raises(TimeoutError):
            wait_for_ready_line(console, proc, 2, "stack-tput", since)
        (serve_logs / "controller_1.log").write_text(f"INFO {READY_PREFIX} 'm' on 1 engine replica(s)\n")
        assert wait_for_ready_line(console, proc, 5, "stack-tput", since) < 5
    finally:
        proc.kill()
