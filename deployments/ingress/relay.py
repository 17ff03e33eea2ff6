"""The call to an engine replica and the relay of its reply to the client.

The replica's first item is a `ReplyHead` (deployments/protocol.py): a complete JSON
reply, or the start of an SSE stream whose chunks are relayed as they come. The
request's deadline (`ingress.request_timeout_s`) bounds every wait on the replica with
`asyncio.timeout_at`, the head's and each chunk's: past it the replica's call is
cancelled (the engine aborts the request) and the client gets a 504, or an error event
on a stream whose status is already sent. A replica whose engine has died answers at
once with a head marked `engine_dead` (nothing ran): the request goes once more, with
`RoutingHints.avoid_replica` so the router picks another replica. The admission is
released when the reply ends, however it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from ray.serve.handle import DeploymentHandle
from starlette.responses import Response

from ruvllm.admission.controller import Admission
from ruvllm.deployments.ingress.errors import error_response, sse_error
from ruvllm.deployments.protocol import EngineRequest, ReplyHead
from ruvllm.deployments.server_timing import RequestTimer

logger = logging.getLogger("ray.serve")

REPLICA_HEADER = "x-ruvllm-replica"


async def relay_reply(engine: DeploymentHandle, envelope: EngineRequest, admission: Admission,
                      timer: RequestTimer, timeout_s: float) -> Response:
    request_id = envelope.request_id
    deadline = asyncio.get_running_loop().time() + timeout_s
    call = engine.options(stream=True).generate
    reply = call.remote(envelope)
    try:
        async with asyncio.timeout_at(deadline):
            head: ReplyHead = await reply.__anext__()
            hints = envelope.hints
            if head.engine_dead and hints is not None and hints.avoid_replica is None:
                # Nothing ran there: once more, elsewhere; the hint also tells this
                # ingress's router to leave that replica out from now on.
                reply.cancel()
                hints = dataclasses.replace(hints, avoid_replica=head.replica_id)
                reply = call.remote(dataclasses.replace(envelope, hints=hints))
                head = await reply.__anext__()
    except asyncio.CancelledError:  # the client went away: so does the replica's call
        reply.cancel()
        raise
    except Exception as e:
        admission.release()
        if _past(deadline):
            reply.cancel()
            return error_response(504, f"request {request_id} timed out after {timeout_s:g} s")
        logger.warning("request %s failed before a reply: %r", request_id, e)
        return error_response(503, "no engine replica could serve the request; retry",
                              headers={"retry-after": "1"})
    headers = {REPLICA_HEADER: head.replica_id, "server-timing": timer.header(head.prepare_s)}
    if not head.is_stream:
        admission.release()
        return JSONResponse(head.body, status_code=head.status, headers=headers)
    stream = _relay_stream(reply, request_id, deadline, admission)
    # If the client is gone before the body starts, the generator never runs its
    # `finally`; releasing when it is collected keeps capacity from leaking.
    weakref.finalize(stream, admission.release)
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


async def _relay_stream(reply: Any, request_id: str, deadline: float,
                        admission: Admission) -> AsyncIterator[str]:
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await reply.__anext__()
            except StopAsyncIteration:
                return
            yield chunk
    except asyncio.CancelledError:
        # The client went away: stop the replica's generator so the engine aborts.
        reply.cancel()
        raise
    except Exception as e:
        if _past(deadline):
            reply.cancel()
            yield sse_error(504, f"request {request_id} exceeded its deadline")
        else:
            logger.warning("stream %s broke: %r", request_id, e)
            yield sse_error(503, "the engine replica serving this stream failed")
        yield "data: [DONE]\n\n"
    finally:
        admission.release()


def _past(deadline: float) -> bool:
    return asyncio.get_running_loop().time() >= deadline
