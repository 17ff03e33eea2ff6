"""The replica's engine-process check (deployments/child_exit.py) on real child
processes: it sees a SIGKILLed child at once and leaves its exit status to its owner."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import time

from ruvllm.deployments.child_exit import has_exited


def _wait_until(predicate, bound_s: float = 5.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < bound_s, "not within the bound"
        time.sleep(0.001)
    return time.monotonic() - started


def test_a_running_child_has_not_exited_and_a_killed_one_has():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not has_exited(child.pid)
        child.send_signal(signal.SIGSTOP)  # stopped is not exited
        time.sleep(0.05)
        assert not has_exited(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        _wait_until(lambda: has_exited(child.pid), bound_s=2.0)
        # Not reaped: the owner still collects the status that the signal gave.
        assert child.wait(timeout=5) == -signal.SIGKILL
        assert has_exited(child.pid)  # and once reaped, it still reads as exited
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _inherit_then_sleep() -> None:
    # A grandchild started by fork keeps every descriptor its parent had, the sentinel
    # pipe's write end included.
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    time.sleep(60)


def test_seen_while_the_process_sentinel_stays_open():
    """The kernel answers even when the exit alone does not close the sentinel pipe that
    `multiprocessing.connection.wait` (vLLM's engine monitor) waits on."""
    proc = multiprocessing.get_context("fork").Process(target=_inherit_then_sleep)
    proc.start()
    try:
        time.sleep(0.3)  # the grandchild is forked
        grandchildren = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children")
                         .read().split()]
        os.kill(proc.pid, signal.SIGKILL)
        _wait_until(lambda: has_exited(proc.pid), bound_s=2.0)
        assert multiprocessing.connection.wait([proc.sentinel], timeout=0.5) == []
        assert proc.exitcode == -signal.SIGKILL  # the status was left for its owner
    finally:
        for pid in grandchildren:
            os.kill(pid, signal.SIGKILL)
        if proc.is_alive():
            proc.kill()
