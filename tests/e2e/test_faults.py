"""Fault injection on the session's app (real Ray Serve, real vLLM-CPU engines, real HTTP):
a base replica's actor killed mid-stream, a replica's engine-core process killed under
load, the placement controller killed. After each, only the requests the dead part held
fail, each with an OpenAI error (an SSE `error` event on a stream, a 5xx JSON body
otherwise), none hangs, routing leaves the dead replica within 2 s, admission capacity
comes back, and Serve restores what was killed (these run last in the session:
tests/conftest.py orders them; the module ends with the app whole again)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import ServeApp

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

BASE = "smollm2-135m-instruct"
REPLICA_HEADER = "x-ruvllm-replica"
LONG_TOKENS = 160  # each stream runs for seconds, so the kill lands mid-stream
REQUEST_BOUND_S = 120.0  # no request may take longer, failed or not ("no hang")
RESTORE_BOUND_S = 300.0
ROUTING_BOUND_S = 2.0  # from a kill until no router chooses the dead replica


# -- the app's actors ------------------------------------------------------------------------

def alive_actors(deployment: str) -> dict[str, "ActorInfo"]:
    """Serve replica unique id -> (actor name, pid) of one deployment's live actors."""
    from ray.util.state import list_actors

    prefix = f"SERVE_REPLICA::ruvllm#{deployment}#"
    return {a.name.removeprefix(prefix): ActorInfo(a.name, a.pid)
            for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
            if (a.name or "").startswith(prefix)}


@dataclass(frozen=True)
class ActorInfo:
    name: str
    pid: int


def kill_actor(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


_LOG_TIME = re.compile(r"^[A-Z]+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
# What a router says when its choice turned out dead: our router, when the replica answers
# that its engine died; Serve's, when the replica's actor is gone or unreachable.
DEAD_CHOICE_MARKS = ("answered that its engine died", "will not be considered for future",
                     "is temporarily unavailable")


def dead_choices(lines: list[str], replica: str) -> list[tuple[float, str]]:
    """(wall-clock time, line) of each log line saying a router chose `replica` and found
    it dead."""
    return [(at, line) for line in lines if any(m in line for m in DEAD_CHOICE_MARKS)
            for at in logged_at([line], replica)]


def running_replicas(deployment: str) -> int:
    """How many replicas of `deployment` Serve's controller counts as running."""
    from ray import serve

    overview = serve.status().applications["ruvllm"].deployments[deployment]
    return sum(n for state, n in overview.replica_states.items() if state == "RUNNING")


def logged_at(lines: list[str], *needles: str) -> list[float]:
    """The wall-clock times of the log lines that hold every one of `needles`."""
    times = []
    for line in lines:
        stamp = _LOG_TIME.match(line)
        if stamp and all(n in line for n in needles):
            times.append(datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


def engine_core(replica_pid: int) -> psutil.Process:
    """The vLLM engine-core process a replica spawned (vLLM titles it VLLM::EngineCore)."""
    children = psutil.Process(replica_pid).children(recursive=True)
    cores = [c for c in children if "EngineCore" in " ".join([c.name(), *c.cmdline()])]
    assert cores, [c.name() for c in children]
    return cores[0]


def wait_for_replicas(serve_app: ServeApp, count: int, without: str,
                      bound_s: float = RESTORE_BOUND_S) -> list[str]:
    """Until `count` base replicas are alive and reporting, none of them `without`."""
    deadline = time.monotonic() + bound_s
    ids: list[str] = []
    while time.monotonic() < deadline:
        ids = [i for i in serve_app.replica_ids() if i in alive_actors("LLMReplica")]
        if len(ids) == count and without not in ids and health(serve_app) == 200:
            return ids
        time.sleep(1)
    raise AssertionError(f"Serve did not restore the replica within {bound_s:g} s: {ids}")


def health(serve_app: ServeApp) -> int:
    return httpx.get(f"{serve_app.base_url}/health", timeout=10).status_code


def inflight_tokens(serve_app: ServeApp) -> float | None:
    """The ingresses' admitted-and-unfinished KV tokens, from Ray's Prometheus endpoint
    (None before the series is exported)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(serve_app.head.metrics_url, timeout=30).text
    values = [sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples
              if sample.name == "ray_ruvllm_admission_inflight_tokens"]
    return sum(values) if values else None


def wait_for_no_inflight(serve_app: ServeApp, bound_s: float = 60.0) -> None:
    # Ray's metrics agent exports every ~10 s; the gauge is per ingress replica.
    deadline = time.monotonic() + bound_s
    value = None
    while time.monotonic() < deadline:
        value = inflight_tokens(serve_app)
        if value == 0:
            return
        time.sleep(2)
    raise AssertionError(f"admission still holds {value} tokens {bound_s:g} s after the fault")


# -- what a client sees ------------------------------------------------------------------------

def is_openai_error(body: object, statuses: range = range(500, 600)) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(error, dict) and isinstance(error.get("message"), str)
            and isinstance(error.get("type"), str) and error.get("code") in statuses)


@dataclass
class Outcome:
    session: str
    stream: bool
    status: int = 0
    replica: str | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False  # a stream's last choice had a finish_reason, then [DONE]
    error: dict | None = None  # the SSE error event, or the JSON error body
    took_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.finished and self.error is None

    @property
    def failed_cleanly(self) -> bool:
        return self.error is not None and is_openai_error({"error": self.error}) and (
            self.stream or self.status in range(500, 600))


def completion_body(i: int, stream: bool, max_tokens: int = LONG_TOKENS) -> dict:
    return {"model": BASE, "prompt": f"Story number {i}: once upon a time,",
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}


async def run_request(client: httpx.AsyncClient, url: str, outcome: Outcome, i: int,
                      max_tokens: int = LONG_TOKENS) -> Outcome:
    started = time.monotonic()
    headers = {"x-session-id": outcome.session}
    body = completion_body(i, outcome.stream, max_tokens)
    try:
        if not outcome.stream:
            outcome.started.set()
            r = await client.post(url, json=body, headers=headers)
            outcome.status, outcome.replica = r.status_code, r.headers.get(REPLICA_HEADER)
            reply = r.json()
            if r.status_code == 200:
                outcome.finished = reply["choices"][0]["finish_reason"] is not None
            else:
                outcome.error = reply.get("error")
            return outcome
        async with client.stream("POST", url, json=body, headers=headers) as r:
            outcome.status, outcome.replica = r.status_code, r.headers.get(REPLICA_HEADER)
            finish, done = None, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    outcome.error = event["error"]
                    continue
                outcome.started.set()
                finish = event["choices"][0].get("finish_reason") or finish
            outcome.finished = done and finish is not None
            return outcome
    finally:
        outcome.started.set()
        outcome.took_s = time.monotonic() - started


def pinned_sessions(serve_app: ServeApp, replicas: list[str], per_replica: int) -> dict[str, str]:
    """Session id -> the replica it sticks to (session affinity), `per_replica` each."""
    pins: dict[str, str] = {}
    url = f"{serve_app.openai_url}/completions"
    for n in range(40):
        if all(sum(1 for r in pins.values() if r == rep) >= per_replica for rep in replicas):
            break
        session = f"fault-{os.getpid()}-{time.monotonic_ns()}-{n}"
        r = httpx.post(url, json=completion_body(n, False, 1), timeout=60,
                       headers={"x-session-id": session})
        assert r.status_code == 200, r.text
        replica = r.headers[REPLICA_HEADER]
        if sum(1 for rep in pins.values() if rep == replica) < per_replica:
            pins[session] = replica
    return pins


@dataclass
class FaultRun:
    victim: str
    survivor: str
    outcomes: list[Outcome]
    after_fault: list[Outcome]  # sent 2 s after the kill
    killed_at: float
    killed_wall: float  # time.time() of the kill, for log lines


async def streams_then_fault(serve_app: ServeApp, sessions: dict[str, str], victim: str,
                             kill) -> FaultRun:
    """Streams and non-streamed requests on both replicas; once every one is running,
    `kill()`; 2 s later, fresh requests. Every request is bounded by REQUEST_BOUND_S."""
    url = f"{serve_app.openai_url}/completions"
    survivor = next(r for r in sessions.values() if r != victim)
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=REQUEST_BOUND_S, limits=limits) as client:
        # Per replica: its sessions' requests, streamed but the last.
        outcomes = []
        for replica in (victim, survivor):
            mine = [s for s, r in sessions.items() if r == replica]
            outcomes += [Outcome(s, stream=(j < len(mine) - 1)) for j, s in enumerate(mine)]
        tasks = [asyncio.create_task(asyncio.wait_for(run_request(client, url, o, i),
                                                      REQUEST_BOUND_S))
                 for i, o in enumerate(outcomes)]
        await asyncio.wait_for(asyncio.gather(*(o.started.wait() for o in outcomes)), 60)
        await asyncio.sleep(0.5)  # the non-streamed ones reach their engine too
        killed_at, killed_wall = time.monotonic(), time.time()
        await asyncio.to_thread(kill)
        await asyncio.sleep(max(0.0, killed_at + 2.0 - time.monotonic()))
        # Fresh sessions, and the victim's own: its router would send those to the victim
        # (session affinity) for as long as the victim is among its candidates.
        after = [Outcome(f"after-{killed_at}-{i}", stream=False) for i in range(2)]
        after += [Outcome(s, stream=False) for s, r in sessions.items() if r == victim]
        after_tasks = [asyncio.wait_for(run_request(client, url, o, 100 + i, 4), REQUEST_BOUND_S)
                       for i, o in enumerate(after)]
        await asyncio.gather(*tasks, *after_tasks)  # a hang raises TimeoutError here
    return FaultRun(victim, survivor, outcomes, after, killed_at, killed_wall)


def check_only_the_victims_requests_failed(run: FaultRun, sessions: dict[str, str]) -> None:
    streams = [o for o in run.outcomes if o.stream]
    assert {o.replica for o in streams} == {run.victim, run.survivor}, \
        "the streams did not run on both replicas"
    for o in run.outcomes:
        if o.stream and o.replica == run.victim:
            assert o.failed_cleanly and not o.finished, o
        elif o.replica == run.survivor:
            assert o.ok, o  # untouched by the fault
        else:  # a non-stream that did not come back from a replica
            assert sessions[o.session] == run.victim and o.failed_cleanly, o
    assert any(o.replica == run.victim and o.failed_cleanly for o in streams)
    # Routing left the dead replica within 2 s: nothing sent then failed or went there.
    for o in run.after_fault:
        assert o.ok and o.replica != run.victim, o


def base_replicas(serve_app: ServeApp) -> list[str]:
    ids = wait_for_replicas(serve_app, 2, without="", bound_s=RESTORE_BOUND_S)
    return sorted(ids)


@dataclass
class PendingRestore:
    """A replica killed by one test, whose replacement the next base-replica test (or the
    module's end) waits for: the controller test needs one replica only, so it runs
    while Serve starts the engine (about a minute here), not after."""

    victim: str | None = None
    killed_at: float = 0.0

    def wait(self, serve_app: ServeApp) -> None:
        if self.victim is None:
            return
        restored = wait_for_replicas(serve_app, 2, without=self.victim)
        print(f"\nreplica {self.victim} replaced by Serve ({sorted(restored)}) "
              f"{time.monotonic() - self.killed_at:.0f} s after the kill")
        self.victim = None


@pytest.fixture(scope="module")
def pending_restore(serve_app):
    pending = PendingRestore()
    yield pending
    pending.wait(serve_app)  # the app is whole again before any later test


def test_replica_actor_killed_mid_stream(serve_app, pending_restore):
    started = time.monotonic()
    replicas = base_replicas(serve_app)
    sessions = pinned_sessions(serve_app, replicas, per_replica=3)
    victim = replicas[0]
    actor = alive_actors("LLMReplica")[victim]
    core = engine_core(actor.pid)
    # Waited for even if this test fails, so that the app is whole for the next.
    pending_restore.victim, pending_restore.killed_at = victim, time.monotonic()
    run = asyncio.run(streams_then_fault(serve_app, sessions, victim,
                                         lambda: kill_actor(actor.name)))
    pending_restore.killed_at = run.killed_at
    check_only_the_victims_requests_failed(run, sessions)
    # The engine core does not outlive its replica (it would keep polling a core).
    gone, alive = psutil.wait_procs([core], timeout=30)
    assert not alive, f"engine core {core.pid} outlived its replica"
    wait_for_no_inflight(serve_app)
    print(f"\nreplica actor kill: test {time.monotonic() - started:.0f} s")


def test_placement_controller_killed(serve_app, adapter_root, pending_restore):
    """Traffic keeps flowing, an adapter registered at run time survives the restart
    (the registry's state file), and /health never drops (no ingress left at capacity 0).
    It may run on one base replica, while Serve replaces the one killed before."""
    started = time.monotonic()
    admin = serve_app.admin_headers()
    name = f"fault-delta-{os.getpid()}"
    r = httpx.post(f"{serve_app.openai_url}/adapters", headers=admin, timeout=60,
                   json={"name": name, "path": str(adapter_root / "delta")})
    assert r.status_code == 201, r.text
    (controller,) = alive_actors("PlacementController").values()

    async def traffic(stop: asyncio.Event) -> tuple[list[int], list[int]]:
        statuses, healths = [], []
        async with httpx.AsyncClient(timeout=REQUEST_BOUND_S) as client:
            async def health_loop() -> None:
                while not stop.is_set():
                    healths.append((await client.get(f"{serve_app.base_url}/health")).status_code)
                    await asyncio.sleep(0.05)

            probe = asyncio.create_task(health_loop())
            i = 0
            while not stop.is_set():
                model = name if i % 2 else BASE
                r = await client.post(f"{serve_app.openai_url}/completions",
                                      json={**completion_body(i, False, 4), "model": model})
                statuses.append(r.status_code)
                i += 1
            await probe
        return statuses, healths

    async def scenario() -> tuple[list[int], list[int], float]:
        stop = asyncio.Event()
        load = asyncio.create_task(traffic(stop))
        await asyncio.sleep(1)
        killed_at = time.monotonic()
        await asyncio.to_thread(kill_actor, controller.name)
        restored = await asyncio.to_thread(wait_for_controller, serve_app, controller.name, name)
        await asyncio.sleep(4)  # past the new controller's warm-up, replicas reporting
        stop.set()
        statuses, healths = await asyncio.wait_for(load, REQUEST_BOUND_S)
        return statuses, healths, restored - killed_at

    statuses, healths, restore_s = asyncio.run(scenario())
    assert statuses and set(statuses) == {200}, statuses
    assert healths and set(healths) == {200}, sorted(set(healths))
    models = httpx.get(f"{serve_app.openai_url}/models", timeout=30).json()
    assert name in {m["id"] for m in models["data"]}
    r = httpx.delete(f"{serve_app.openai_url}/adapters/{name}", headers=admin, timeout=60)
    assert r.status_code == 200, r.text
    print(f"\ncontroller kill: {len(statuses)} requests all 200, {len(healths)} health "
          f"probes all 200, controller back with the adapter after {restore_s:.0f} s; "
          f"test {time.monotonic() - started:.0f} s")


def test_engine_process_killed_under_load(serve_app, pending_restore):
    """Besides what a client sees: from 2 s after the kill on, the router does not choose
    the dead replica for any request, the victim's own sessions among them, which session
    affinity sends to it while it is a candidate. A router that chose it logs so (the
    replica's engine-dead answer, or Serve's retry past a dead actor). The replica tells
    every router through its routing stats (a router with nothing in flight there learns
    it the same way), then exits."""
    from ruvllm.deployments.child_exit import has_begun_exiting

    started = time.monotonic()
    pending_restore.wait(serve_app)  # the replica the first test killed is back
    replicas = base_replicas(serve_app)
    sessions = pinned_sessions(serve_app, replicas, per_replica=3)
    victim = replicas[1]
    actor = alive_actors("LLMReplica")[victim]
    replica_process = psutil.Process(actor.pid)
    core = engine_core(actor.pid)
    # Waited for even if this test fails, so that the app is whole for the next.
    pending_restore.victim, pending_restore.killed_at = victim, time.monotonic()
    timeline: dict[str, float] = {}

    def kill() -> None:
        os.kill(core.pid, signal.SIGKILL)
        killed = time.monotonic()

        def watch() -> None:  # how the kill unfolds
            asked = 0.0
            while time.monotonic() - killed < 30 and len(timeline) < 4:
                now = time.monotonic() - killed
                if "core exiting" not in timeline and has_begun_exiting(core.pid):
                    timeline["core exiting"] = now
                if "core exited" not in timeline and core_exited(core.pid):
                    timeline["core exited"] = now
                if "replica exited" not in timeline and not replica_process.is_running():
                    timeline["replica exited"] = now
                if "Serve dropped it" not in timeline and now - asked >= 0.1:
                    asked = now
                    if running_replicas("LLMReplica") < 2:
                        timeline["Serve dropped it"] = time.monotonic() - killed
                time.sleep(0.005)

        threading.Thread(target=watch, daemon=True).start()

    run = asyncio.run(streams_then_fault(serve_app, sessions, victim, kill))
    pending_restore.killed_at = run.killed_at
    print(f"\nsent 2 s after the engine kill (status, replica, s): "
          f"{[(o.status, o.replica, round(o.took_s, 2)) for o in run.after_fault]}")
    check_only_the_victims_requests_failed(run, sessions)
    assert any(sessions.get(o.session) == victim for o in run.after_fault)
    late = [(round(at - run.killed_wall, 2), line) for at, line
            in dead_choices(serve_app.ingress_log_lines(), victim)
            if at >= run.killed_wall + ROUTING_BOUND_S]
    print(f"after the kill (s): {({k: round(v, 2) for k, v in timeline.items()})}; "
          f"dead-replica lines from 2 s on: {late}")
    # The engine-dead answer only ever comes to a request routed there. Serve's actor-died
    # line also comes once for each request that was in flight there when the actor went
    # (the replica stays up two stats periods, so those come after 2 s): more than that
    # many is a choice made for a request sent 2 s after the kill. (Measured: 3 lines, the
    # 3 in flight; 11 when the replica exited at once and told no router.)
    assert not [line for _, line in late if DEAD_CHOICE_MARKS[0] in line], late
    held = sum(1 for o in run.outcomes if sessions[o.session] == victim)
    assert len(late) <= held, f"a router chose the dead replica 2 s after the kill: {late}"
    # The replica whose engine died goes away itself, so that Serve replaces it.
    gone, alive = psutil.wait_procs([replica_process], timeout=30)
    assert not alive, "the replica outlived its engine"
    time.sleep(0.1)
    wait_for_no_inflight(serve_app)
    pending_restore.wait(serve_app)
    print(f"\nengine process kill: test {time.monotonic() - started:.0f} s")


def core_exited(pid: int) -> bool:
    """The whole process is gone (only its zombie main thread left, or not even that)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return fields["State"].strip().startswith(("Z", "X")) and int(fields["Threads"]) <= 1


def wait_for_controller(serve_app: ServeApp, dead: str, adapter: str,
                        bound_s: float = 120.0) -> float:
    """Until a new controller actor answers and lists `adapter`; when it did."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        actors = alive_actors("PlacementController")
        if actors and all(a.name != dead for a in actors.values()):
            try:
                described = httpx.get(f"{serve_app.openai_url}/adapters",
                                      headers=serve_app.admin_headers(), timeout=10)
                if described.status_code == 200 and adapter in {
                        a["name"] for a in described.json()["adapters"]}:
                    return time.monotonic()
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"the placement controller was not restored within {bound_s:g} s")
