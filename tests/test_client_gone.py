"""A client that disconnects mid-stream, as Serve tells the ingress's ASGI app: its
`receive` raises TaskCancelledError (deployments/client_gone.py). The app must end the
stream and return, not raise into a task nobody reads ("Task exception was never
retrieved" in the ingress log). The e2e check of the log:
tests/e2e/test_openai_api.py::test_disconnected_stream_frees_its_engine_request."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from ray.exceptions import TaskCancelledError

from ruvllm.deployments.client_gone import ClientGoneAsDisconnect


def streaming_app(events: list[str], middleware: bool) -> FastAPI:
    app = FastAPI()
    if middleware:
        app.add_middleware(ClientGoneAsDisconnect)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():
            try:
                while True:
                    yield "data: token\n\n"
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                events.append("stream cancelled")  # the ingress cancels the replica here
                raise
        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


async def call(app: FastAPI) -> list[dict]:
    """One GET /stream whose client goes away after the response starts, the way Serve's
    receive proxy reports it."""
    sent: list[dict] = []
    started = asyncio.Event()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "GET", "scheme": "http", "path": "/stream",
             "raw_path": b"/stream", "root_path": "", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    requested = False

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await started.wait()
        await asyncio.sleep(0.05)
        raise TaskCancelledError()  # ray.serve's ASGIReceiveProxy, client gone

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.start":
            started.set()

    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


def test_without_it_the_disconnect_escapes_as_an_exception():
    with pytest.raises(TaskCancelledError):
        asyncio.run(call(streaming_app([], middleware=False)))


def test_a_disconnect_ends_the_stream_and_the_call_cleanly():
    events: list[str] = []
    sent = asyncio.run(call(streaming_app(events, middleware=True)))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert any(m.get("body") == b"data: token\n\n" for m in sent[1:])
    assert events == ["stream cancelled"]
