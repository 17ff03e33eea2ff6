"""Requests are charged as the engine runs them (pure logic)."""

from __future__ import annotations

from ruvllm.deployments.footprint import request_footprint


def test_n_and_batched_prompts_multiply_the_charge():
    one = request_footprint([100], 1, 50, 2048, 256)
    assert (one.sequences, one.kv_tokens) == (1, 150)
    n4 = request_footprint([100], 4, 50, 2048, 256)
    assert (n4.sequences, n4.kv_tokens) == (4, 600)
    batch = request_footprint([100, 10, 40], 2, 50, 2048, 256)
    assert batch.sequences == 6
    assert batch.kv_tokens == 2 * (150 + 60 + 90)
    assert batch.max_tokens_for_engine is None  # the client set max_tokens


def test_omitted_max_tokens_is_told_to_the_engine_and_charged():
    f = request_footprint([100], 1, None, 2048, 256)
    assert f.max_tokens_for_engine == 256 and f.kv_tokens == 356


def test_omitted_max_tokens_without_room_for_the_default_charges_the_context():
    f = request_footprint([1900], 1, None, 2048, 256)
    assert f.max_tokens_for_engine is None and f.kv_tokens == 2048
    g = request_footprint([100, 1900], 3, None, 2048, 256)  # one batch member too long
    assert g.max_tokens_for_engine is None and g.kv_tokens == 3 * 2 * 2048
    h = request_footprint([100], 1, None, 2048, None)  # no default: vLLM's own
    assert h.max_tokens_for_engine is None and h.kv_tokens == 2048
