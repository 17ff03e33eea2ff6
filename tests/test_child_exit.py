"""The replica's engine-process check (deployments/child_exit.py) on real child
processes: it sees a SIGKILLed child at once and leaves its exit status to its owner, and
it sees the exit begin while the kernel is still tearing the process down."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import time

from ruvllm.deployments.child_exit import has_begun_exiting, has_exited


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


# A child with an address space worth tearing down (1 GiB, touched) and busy threads, as an
# engine core has: its exit takes a while after the kill (hundreds of ms here, ~6 s for the
# engine core on 2 loaded cores).
_BIG_BUSY_CHILD = """
import sys, threading, time
block = bytearray(1 << 30)
for i in range(0, len(block), 4096):
    block[i] = 1
def spin():
    while True:
        pass
for _ in range(2):
    threading.Thread(target=spin, daemon=True).start()
print("ready", flush=True)
time.sleep(120)
"""


def test_a_killed_child_is_seen_exiting_before_it_has_exited():
    """`has_begun_exiting` answers in the window where the kill has landed but `waitid`
    (and vLLM's sentinel pipe) cannot tell yet: the replica's whole head start."""
    for attempt in range(3):  # the window is a scheduling matter on a loaded machine
        child = subprocess.Popen([sys.executable, "-c", _BIG_BUSY_CHILD],
                                 stdout=subprocess.PIPE)
        try:
            assert child.stdout.readline() == b"ready\n"
            assert not has_begun_exiting(child.pid)
            child.send_signal(signal.SIGSTOP)  # stopped is not exiting
            time.sleep(0.05)
            assert not has_begun_exiting(child.pid)
            os.kill(child.pid, signal.SIGKILL)
            _wait_until(lambda: has_begun_exiting(child.pid), bound_s=5.0)
            exited_already = has_exited(child.pid)
            _wait_until(lambda: has_exited(child.pid), bound_s=30.0)
            assert has_begun_exiting(child.pid)  # a zombie still reads as exiting
            assert child.wait(timeout=5) == -signal.SIGKILL  # the status left for its owner
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if not exited_already:
            return
    raise AssertionError("the exit was never seen before waitid reported it")


def test_a_main_thread_that_exits_alone_is_not_the_process_exiting():
    """pthread_exit in the main thread leaves it a zombie while the others run on."""
    child = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,)).start()\n"
        "ctypes.CDLL(None).pthread_exit(None)\n")])
    try:
        _wait_until(lambda: open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0]
                    == "Z")
        assert len(os.listdir(f"/proc/{child.pid}/task")) == 2
        assert not has_begun_exiting(child.pid)
        assert not has_exited(child.pid)
    finally:
        child.kill()
        child.wait()


def test_an_unknown_pid_is_left_to_has_exited(tmp_path):
    assert not has_begun_exiting(2 ** 22 + 1)  # beyond pid_max: no such process
    assert not has_begun_exiting(1, proc=tmp_path)  # /proc unreadable
