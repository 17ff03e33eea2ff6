"""A request that meets a replica whose engine had died (a 503 head marked engine_dead,
sent before anything ran) is sent once more, naming that replica for the router to avoid;
the client sees the second replica's answer. Pure dispatch logic: the ingress's real
relay (deployments/ingress/relay.py) with a fake deployment handle standing in for Serve."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ruvllm.admission.controller import Admission
from ruvllm.deployments.ingress.relay import REPLICA_HEADER, relay_reply
from ruvllm.deployments.protocol import EngineRequest, ReplyHead, engine_died_head
from ruvllm.deployments.server_timing import RequestTimer
from ruvllm.router.hints import RoutingHints


class FakeReply:
    def __init__(self, head: ReplyHead) -> None:
        self._head = head
        self.cancelled = False

    async def __anext__(self) -> ReplyHead:
        return self._head

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeHandle:
    """Each call is answered by the next head; records the hints each call carried."""

    heads: list[ReplyHead]
    calls: list[RoutingHints] = field(default_factory=list)
    replies: list[FakeReply] = field(default_factory=list)

    def options(self, **_: Any) -> "FakeHandle":
        return self

    @property
    def generate(self) -> "FakeHandle":
        return self

    def remote(self, envelope: EngineRequest) -> FakeReply:
        self.calls.append(envelope.hints)
        self.replies.append(FakeReply(self.heads[len(self.calls) - 1]))
        return self.replies[-1]


class CountingAdmission(Admission):
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


def dispatch(heads: list[ReplyHead]) -> tuple[Any, FakeHandle, CountingAdmission]:
    handle, admission = FakeHandle(heads), CountingAdmission()
    envelope = EngineRequest("completion", {"prompt": "hi"}, "r1",
                             RoutingHints(prompt_tokens=2, max_tokens=4))

    async def run():
        return await relay_reply(handle, envelope, admission, RequestTimer(), 60.0)

    return asyncio.run(run()), handle, admission


def ok(replica: str) -> ReplyHead:
    return ReplyHead(200, {"choices": [{"text": "hi", "finish_reason": "length"}]},
                     replica_id=replica)


def dead(replica: str) -> ReplyHead:
    return dataclasses.replace(engine_died_head(), replica_id=replica)


def test_a_request_that_met_a_dead_engine_is_sent_once_more_avoiding_that_replica():
    response, handle, admission = dispatch([dead("a"), ok("b")])
    assert response.status_code == 200
    assert response.headers[REPLICA_HEADER] == "b"
    assert [h.avoid_replica for h in handle.calls] == [None, "a"]
    assert handle.replies[0].cancelled
    assert admission.released == 1  # charged once, released once


def test_only_once_a_second_dead_engine_is_the_clients_503():
    response, handle, admission = dispatch([dead("a"), dead("b"), ok("c")])
    assert response.status_code == 503
    assert json.loads(response.body)["error"]["code"] == 503
    assert len(handle.calls) == 2 and admission.released == 1


def test_other_errors_are_not_retried():
    refused = ReplyHead(400, {"error": {"message": "bad", "type": "BadRequestError",
                                        "param": None, "code": 400}}, replica_id="a")
    response, handle, _ = dispatch([refused, ok("b")])
    assert response.status_code == 400 and len(handle.calls) == 1
