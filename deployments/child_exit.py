"""Whether a child process has exited or begun to, asked of the kernel without reaping it.

A replica watches its vLLM engine-core process this way, besides vLLM's own `errored`
flag. vLLM's monitor thread (MPClient.start_engine_core_monitor) learns of the exit from
the process's sentinel pipe, which stays open while any process that inherited its write
end lives (tests/test_child_exit.py), and marks the engine dead only after its process
manager's shutdown has returned. WNOWAIT leaves the exit status for vLLM's own `Process`
handle, so its monitor and shutdown still see the exit code.

`waitid` (and the sentinel pipe) answer only once the whole process has gone, after the
kernel has torn down its address space: in the fault test on 2 loaded cores a SIGKILLed
engine core took about 6 s to get there (a child holding 4 GiB: 1.0 s here, on an idle
machine). Each thread, though, marks itself exiting (PF_EXITING, in /proc's `stat`) as soon
as it takes the signal, milliseconds after the kill, and no thread comes back from that:
`has_begun_exiting` reads that, so the replica stops serving (and Serve's routers stop
choosing it) seconds earlier.
"""

from __future__ import annotations

import os
from pathlib import Path

# include/linux/sched.h: set in do_exit() before anything is released.
PF_EXITING = 0x00000004
_GONE_STATES = frozenset("ZX")  # zombie, dead


def has_exited(pid: int) -> bool:
    """True once the child `pid` has exited (a zombie, or already reaped by its
    `multiprocessing.Process` handle); False while it runs or is merely stopped."""
    try:
        state = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped already: it exited
        return True
    return state is not None


def has_begun_exiting(pid: int, proc: Path = Path("/proc")) -> bool:
    """True once every thread of `pid` is exiting or gone: killed by a fatal signal (or
    having called exit) but not yet torn down. False while any thread still runs user
    code, and when /proc cannot say (`has_exited` covers a process already gone).
    One read of the main thread's stat when it is alive, so it is cheap to poll; a main
    thread that exits alone (pthread_exit) leaves the others running, which reads False."""
    if not _task_exiting(proc / str(pid) / "stat"):
        return False
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return False
    # A thread that finished exiting is reaped at once and leaves the list.
    return all(_task_exiting(task / "stat", gone=True) for task in tasks)


def _task_exiting(stat: Path, gone: bool = False) -> bool:
    try:
        text = stat.read_text()
    except OSError:
        return gone
    # "pid (comm) state ppid pgrp session tty_nr tpgid flags ...": comm may hold ") ".
    fields = text[text.rfind(")") + 2:].split()
    return fields[0] in _GONE_STATES or bool(int(fields[6]) & PF_EXITING)
