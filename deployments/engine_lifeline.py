"""An engine process ends with the process that started it.

vLLM runs its engine core (and, with several GPUs, its workers) in child processes and
never checks that the parent is still there. When a replica dies hard (SIGKILL, `ray stop
--force`, a node agent killing the worker), the engine core lives on as an orphan and keeps
its GPU: on an H200 an orphaned engine core held 122 GiB after `ray stop --force`, and every
replica started next on that card failed with "Free memory on device (17.3/139.8 GiB) ...
is less than desired GPU memory utilization".

vLLM loads `vllm.general_plugins` entry points in every process it starts, engine core
included; this one, in a process that has a multiprocessing parent, waits on the parent's
sentinel in a daemon thread and, once the parent is gone, stops this process: SIGTERM
first (vLLM's engine core shuts its executor down on it), a hard exit if that has not
ended it within `GRACE_S`. A process without a multiprocessing parent (a Ray worker, a
`vllm serve` API server) is left alone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import wait

logger = logging.getLogger(__name__)

GRACE_S = 10.0


def register() -> None:
    """vLLM plugin entry point; idempotent (vLLM may load plugins more than once)."""
    parent = multiprocessing.parent_process()
    if parent is None or any(t.name == "ruvllm-lifeline" for t in threading.enumerate()):
        return
    threading.Thread(target=_end_with, args=(parent,), name="ruvllm-lifeline",
                     daemon=True).start()


def _end_with(parent: multiprocessing.process.BaseProcess) -> None:
    wait([parent.sentinel])
    logger.warning("engine process %d: its parent %s (pid %s) is gone; stopping",
                   os.getpid(), parent.name, parent.pid)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)
