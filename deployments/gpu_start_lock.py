"""One engine at a time starts on a GPU that replicas share.

vLLM sizes its KV cache from a memory profile it takes while it starts, counting what the
card holds beyond its own weights and activations as taken by others. Two engines that
profile one card at the same moment each see the other's allocations grow under them: on
an H200 (2026-12-01 04:16 UTC, the GPU tests, a base and an X-LoRA replica with
`num_gpus: 0.4` each) the X-LoRA engine failed with vLLM's "No available memory for the
cache blocks" while the base engine profiled, and Serve had to replace it. So a replica
holds a lock per GPU it was given (a file lock in the node's temp directory, which every
replica on that node shares) from engine start to ready. A replica with a whole GPU
takes its lock uncontended; one without a GPU takes none.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path


@contextlib.asynccontextmanager
async def gpu_start_lock(gpu_ids: list[str], directory: Path | None = None) -> AsyncIterator[None]:
    """Hold the start lock of every GPU in `gpu_ids` (in one order, so that two replicas
    given the same GPUs cannot each hold one the other waits for)."""
    directory = directory or Path(tempfile.gettempdir())
    files = []
    try:
        for gpu in sorted(set(gpu_ids)):
            f = open(directory / f"ruvllm-gpu-{gpu}-engine-start.lock", "a+")  # noqa: SIM115
            files.append(f)
            # flock blocks: in a thread, so that the replica's event loop keeps answering
            # Serve's health checks while it waits its turn.
            await asyncio.to_thread(fcntl.flock, f, fcntl.LOCK_EX)
        yield
    finally:
        for f in files:
            f.close()  # closing the file releases its lock
