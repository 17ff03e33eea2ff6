"""Input bounds the ingress checks before any work (pure logic)."""

from __future__ import annotations

import asyncio
import json

import pytest

from ruvllm.deployments import request_limits as rl
from conftest import status_of
from ruvllm.deployments.client_error import ClientError


def test_deeply_nested_json_is_a_400_not_a_500():
    deep = b"[" * 100_000 + b"]" * 100_000  # past the JSON parser's recursion limit
    assert status_of(lambda: rl.parse_json_object(b'{"a": ' + deep + b"}")) == 400
    nested = {"model": "m", "x": json.loads("[" * 70 + "]" * 70)}
    assert status_of(lambda: rl.parse_json_object(json.dumps(nested).encode())) == 400
    fine = {"model": "m", "tools": [{"function": {"parameters": json.loads(
        '{"a":' * 20 + "1" + "}" * 20)}}]}
    assert rl.parse_json_object(json.dumps(fine).encode()) == fine
    assert status_of(lambda: rl.parse_json_object(b"[1]")) == 400
    assert status_of(lambda: rl.parse_json_object(b"{nope")) == 400


@pytest.mark.parametrize("raw,param", [
    # Found by the HTTP fuzzer (tests/e2e/test_http_fuzz.py): vLLM answered these 500.
    (b'{"model": "m", "top_k": 99999999999999999999}', "top_k"),
    (b'{"model": "m", "stream_interval": 629020080682760315825851488796672}',
     "stream_interval"),
    (b'{"model": "m", "logit_bias": {"1": -9223372036854775809}}', "logit_bias.1"),
    (b'{"model": "m", "messages": [{"x": [1, 18446744073709551616]}]}', "messages.0.x.1"),
])
def test_integers_beyond_64_bits_are_a_400(raw, param):
    with pytest.raises(ClientError) as e:
        rl.parse_json_object(raw)
    assert e.value.status == 400 and e.value.param == param


def test_an_integer_too_long_for_python_is_a_400_not_a_500():
    """More than 4300 digits: json.loads raises a plain ValueError (was a 500)."""
    raw = b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}"
    assert status_of(lambda: rl.parse_json_object(raw)) == 400
    edge = {"seed": 2**63 - 1, "x": -2**63, "ok": True, "f": 1e300}
    assert rl.parse_json_object(json.dumps(edge).encode()) == edge


@pytest.mark.parametrize("body,param", [
    ({"stop": ["x"] * (rl.MAX_STOP_SEQUENCES + 1)}, "stop"),
    ({"stop": "x" * (rl.MAX_STOP_CHARS + 1)}, "stop"),
    ({"stop": ["ok", "y" * (rl.MAX_STOP_CHARS + 1)]}, "stop"),
    ({"stop_token_ids": list(range(rl.MAX_STOP_SEQUENCES * 4 + 1))}, "stop_token_ids"),
    ({"user": "u" * (rl.MAX_USER_CHARS + 1)}, "user"),
])
def test_unbounded_fields_are_refused(body, param):
    with pytest.raises(ClientError) as e:
        rl.check_fields(body)
    assert e.value.status == 400 and e.value.param == param


def test_reasonable_fields_pass():
    rl.check_fields({"stop": ["\n\n", "END"], "user": "alice", "stop_token_ids": [1, 2]})
    rl.check_fields({"stop": None, "user": None})


def test_long_id_headers_are_refused():
    headers = {"x-session-id": "s" * (rl.MAX_HEADER_ID_CHARS + 1), "x-tenant-id": "t"}
    assert status_of(lambda: rl.check_headers(headers, ("x-session-id",))) == 400
    assert status_of(lambda: rl.check_headers(headers, ("x-tenant-id",))) is None


class Chunks:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.read = chunks, 0

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for c in self.chunks:
            self.read += 1
            yield c


def test_body_limit_from_content_length_before_reading_and_while_reading():
    async def scenario():
        stream = Chunks([b"x" * 10] * 10)
        with pytest.raises(ClientError) as e:
            await rl.read_body(stream, "100", 50)
        assert e.value.status == 413 and stream.read == 0
        stream = Chunks([b"x" * 10] * 10)  # no (or a lying) Content-Length
        with pytest.raises(ClientError) as e:
            await rl.read_body(stream, None, 50)
        assert e.value.status == 413 and stream.read == 6
        assert await rl.read_body(Chunks([b"ab", b"c"]), "3", 50) == b"abc"
        with pytest.raises(ClientError) as e:
            await rl.read_body(Chunks([]), "lots", 50)
        assert e.value.status == 400

    asyncio.run(scenario())
