"""The ingress's relay of a replica's reply (deployments/ingress/relay.py), with a fake
replica call in place of Serve's handle (pure logic; the HTTP suite runs the real one):
JSON or SSE by the head, the deadline's 504 before and during a stream, a failed
replica's 503, and the admission released exactly when the reply ends."""

from __future__ import annotations

import asyncio
import json

from ruvllm.deployments.ingress.relay import relay_reply
from ruvllm.deployments.protocol import EngineRequest, ReplyHead
from ruvllm.deployments.server_timing import RequestTimer


class Reply:
    """A replica call's stream: `items`, each after `delay_s`; an exception is raised."""

    def __init__(self, items, delay_s=0.0):
        self.items, self.delay_s, self.cancelled = list(items), delay_s, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(self.delay_s)
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class Handle:
    def __init__(self, reply):
        self.reply, self.sent = reply, []
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, envelope):
        self.sent.append(envelope)
        return self.reply


class Admission:
    released = 0

    def release(self):
        self.released += 1


def run(reply, timeout_s=5.0):
    async def main():
        handle, admission = Handle(reply), Admission()
        envelope = EngineRequest("chat", object(), "req-1")
        response = await relay_reply(handle, envelope, admission, RequestTimer(), timeout_s)
        body = ""
        if hasattr(response, "body_iterator"):
            body = "".join([chunk async for chunk in response.body_iterator])
        else:
            body = response.body.decode()
        return handle, admission, response, body

    return asyncio.run(main())


def test_a_json_head_is_the_reply():
    handle, admission, response, body = run(Reply([ReplyHead(200, {"ok": 1}, "r1", 0.01)]))
    assert handle.sent[0].request_id == "req-1"
    assert response.status_code == 200 and json.loads(body) == {"ok": 1}
    assert response.headers["x-ruvllm-replica"] == "r1"
    assert "server-timing" in response.headers
    assert admission.released == 1


def test_a_stream_is_relayed_and_released_at_its_end():
    _, admission, response, body = run(Reply([ReplyHead(200), "data: a\n\n", "data: b\n\n"]))
    assert response.media_type == "text/event-stream"
    assert body == "data: a\n\ndata: b\n\n"
    assert admission.released >= 1


def test_past_the_deadline_before_the_head_is_a_504_and_the_call_is_cancelled():
    reply = Reply([ReplyHead(200)], delay_s=1.0)
    _, admission, response, body = run(reply, timeout_s=0.05)
    assert response.status_code == 504 and json.loads(body)["error"]["code"] == 504
    assert reply.cancelled and admission.released == 1


def test_past_the_deadline_mid_stream_ends_with_a_504_event():
    class Slow(Reply):
        async def __anext__(self):
            if len(self.items) == 1:  # the second chunk never comes in time
                await asyncio.sleep(1.0)
            return await super().__anext__()

    reply = Slow([ReplyHead(200), "data: a\n\n", "data: b\n\n"])
    _, admission, response, body = run(reply, timeout_s=0.1)
    events = [e for e in body.split("\n\n") if e]
    assert events[0] == "data: a" and events[-1] == "data: [DONE]"
    assert json.loads(events[1][len("data: "):])["error"]["code"] == 504
    assert reply.cancelled and admission.released >= 1


def test_a_replica_that_fails_is_a_503_to_retry():
    _, admission, response, body = run(Reply([RuntimeError("actor died")]))
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert admission.released == 1
    _, admission, response, body = run(Reply([ReplyHead(200), "data: a\n\n",
                                              RuntimeError("actor died")]))
    assert '"code": 503' in body and body.endswith("data: [DONE]\n\n")
