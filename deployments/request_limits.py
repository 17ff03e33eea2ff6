"""Bounds on what a client may send, checked by the ingress before any work is done.

The body's size is configured (`ingress.max_body_bytes`, answered 413 before parsing);
the rest are fixed here, far above what OpenAI's own API accepts (4 stop sequences,
`user` as an id), and low enough that none of them costs the engine or the ingress's
tables noticeable work: stop strings are matched against the output at every step,
and `user`, `x-session-id` and the tenant header become keys of in-memory tables.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from ruvllm.deployments.client_error import ClientError

MAX_JSON_DEPTH = 64  # OpenAI bodies nest < 10 levels; tool schemas a few more
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 512  # per stop sequence
MAX_USER_CHARS = 256
MAX_HEADER_ID_CHARS = 256  # x-session-id, the tenant header
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 (never a RecursionError's 500)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClientError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ClientError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:  # Python's own bound: an integer of more than 4300 digits
        raise ClientError(400, "request body has an integer out of the 64-bit range") from None
    if not isinstance(body, dict):
        raise ClientError(400, "request body must be a JSON object")
    _check_structure(body)
    return body


def _check_structure(value: Any) -> None:
    """Nesting within MAX_JSON_DEPTH, and every integer within 64 bits: vLLM passes some
    fields (top_k, stream_interval) to code that fails on a larger one with a 500."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ClientError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        for key, child in (node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1, f"{path}.{key}" if path else str(key)))
            elif type(child) is int and not INT64_MIN <= child <= INT64_MAX:
                where = f"{path}.{key}" if path else str(key)
                raise ClientError(400, f"{where}: integer out of the 64-bit range", where)


def check_fields(body: dict[str, Any]) -> None:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ClientError(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences", "stop")
    if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stops):
        raise ClientError(400, f"stop: each sequence at most {MAX_STOP_CHARS} characters", "stop")
    stop_ids = body.get("stop_token_ids")
    if isinstance(stop_ids, list) and len(stop_ids) > MAX_STOP_SEQUENCES * 4:
        raise ClientError(400, f"stop_token_ids: at most {MAX_STOP_SEQUENCES * 4} tokens",
                          "stop_token_ids")
    user = body.get("user")
    if isinstance(user, str) and len(user) > MAX_USER_CHARS:
        raise ClientError(400, f"user: at most {MAX_USER_CHARS} characters", "user")


def check_headers(headers: Mapping[str, str], names: tuple[str, ...]) -> None:
    for name in names:
        value = headers.get(name)
        if value is not None and len(value) > MAX_HEADER_ID_CHARS:
            raise ClientError(400, f"header {name}: at most {MAX_HEADER_ID_CHARS} characters")


async def read_body(receive_stream: Any, content_length: str | None, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed `max_bytes`:
    from Content-Length before reading, else while reading."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise ClientError(400, "invalid Content-Length") from None
        if declared > max_bytes:
            raise _too_large(declared, max_bytes)
    chunks, size = [], 0
    async for chunk in receive_stream:
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, max_bytes: int) -> ClientError:
    return ClientError(413, f"request body of {size}+ bytes exceeds the limit of {max_bytes} "
                       "bytes (ingress.max_body_bytes)")


async def read_json_object(request: Any, max_bytes: int) -> dict[str, Any]:
    """A Starlette request's body, bounded and parsed as above."""
    raw = await read_body(request.stream(), request.headers.get("content-length"), max_bytes)
    return parse_json_object(raw)
