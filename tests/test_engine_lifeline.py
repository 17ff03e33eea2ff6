"""An engine process ends with its parent (deployments/engine_lifeline.py): a process
started by multiprocessing, as vLLM starts its engine core, loads vLLM's general plugins
the way the engine core does, and must exit once its parent is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time


PARENT = textwrap.dedent("""
    import multiprocessing, sys, time

    def engine_like():
        from vllm.plugins import load_general_plugins
        load_general_plugins()  # what vLLM's engine core does first
        import threading
        print("lifeline" if any(t.name == "ruvllm-lifeline" for t in threading.enumerate())
              else "no lifeline", flush=True)
        time.sleep(600)

    if __name__ == "__main__":
        child = multiprocessing.get_context("spawn").Process(target=engine_like)
        child.start()
        print(child.pid, flush=True)
        time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (its parent, the test, has not reaped it).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_an_engine_like_child_exits_when_its_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "lifeline"  # vLLM loaded the entry point
    time.sleep(1)
    assert _alive(child), "the lifeline ended a process whose parent is alive"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the orphaned engine-like process outlived its parent by 15 s"
