"""A client that went away reads as ASGI's `http.disconnect`, not as an exception.

When a client disconnects, Serve cancels the ingress's request, and Serve's `receive`
for the HTTP body (`ASGIReceiveProxy`) raises `TaskCancelledError` where the ASGI spec
answers `{"type": "http.disconnect"}`. A streaming response listens for the disconnect
(starlette's `StreamingResponse.listen_for_disconnect`), so the exception ended the whole
ASGI call, in a task of Serve's whose result nobody reads any more: asyncio printed
"Task exception was never retrieved" and the traceback to the ingress's log, once per
disconnecting client (26 in the 10-minute soak run). As a disconnect, the response stops
its stream (the relay's CancelledError cancels the replica's request, so vLLM aborts it)
and the call ends cleanly.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from ray.exceptions import TaskCancelledError

Message = dict[str, Any]


class ClientGoneAsDisconnect:
    """ASGI middleware around the ingress's FastAPI app."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def receive_or_disconnect() -> Message:
            try:
                return await receive()
            except TaskCancelledError:
                return {"type": "http.disconnect"}

        await self.app(scope, receive_or_disconnect, send)
