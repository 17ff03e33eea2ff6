"""Whether a child process has exited, asked of the kernel without reaping it.

A replica watches its vLLM engine-core process this way, besides vLLM's own `errored`
flag. vLLM's monitor thread (MPClient.start_engine_core_monitor) learns of the exit from
the process's sentinel pipe, which stays open while any process that inherited its write
end lives (tests/test_child_exit.py), and marks the engine dead only after its process
manager's shutdown has returned. WNOWAIT leaves the exit status for vLLM's own `Process`
handle, so its monitor and shutdown still see the exit code.

Neither can be earlier than the kernel's exit of the process: in the fault test on 2
loaded cores, a SIGKILLed engine core took about 6 s to exit, and vLLM's monitor and this
check saw it in the same second. Requests that reach the replica meanwhile are retried
elsewhere (deployments/ingress/relay.py, router/placement_router.py).
"""

from __future__ import annotations

import os


def has_exited(pid: int) -> bool:
    """True once the child `pid` has exited (a zombie, or already reaped by its
    `multiprocessing.Process` handle); False while it runs or is merely stopped."""
    try:
        state = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped already: it exited
        return True
    return state is not None
