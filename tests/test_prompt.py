"""The ingress's prompt measure: the size bound that refuses a far-too-long prompt without
tokenizing it never refuses one that fits, and batches report each prompt's length."""

from __future__ import annotations

import random

import pytest

from ruvllm.deployments.prompt import PromptInspector, PromptTooLong


@pytest.fixture(scope="module")
def inspector(base_model_path) -> PromptInspector:
    return PromptInspector(str(base_model_path), 32, 8, max_model_len=2048)


def test_no_text_has_fewer_tokens_than_its_bytes_allow(inspector):
    rng = random.Random(0)
    alphabet = ["a", " ", "\n", "0", "-", "é", "中", "🙂", "Paris", "    ", "=====", "<|im_start|>"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 400)))
             for _ in range(200)]
    texts += [" " * 5000, "-" * 5000, "a" * 5000, "0" * 5000, "\n" * 5000]
    for text in texts:
        tokens = inspector.completion(text).tokens
        assert tokens * inspector.max_token_bytes >= len(text.encode()), text[:40]


def test_far_too_long_prompts_are_refused_before_tokenizing(inspector):
    bound = inspector.max_model_len * inspector.max_token_bytes
    with pytest.raises(PromptTooLong) as e:
        inspector.check_chat_size([{"role": "user", "content": "x" * (bound + 1)}])
    assert e.value.param == "messages"
    with pytest.raises(PromptTooLong):
        inspector.check_chat_size([{"role": "user", "content": [
            {"type": "text", "text": "y" * (bound // 2 + 1)}] * 2}])
    with pytest.raises(PromptTooLong):
        inspector.check_chat_size([{"role": "user", "content": ""}] * 2049)
    with pytest.raises(PromptTooLong):
        inspector.check_completion_size(["ok", "z" * (bound + 1)])
    with pytest.raises(PromptTooLong):
        inspector.check_completion_size(list(range(2049)))
    inspector.check_chat_size([{"role": "user", "content": "x" * bound}])
    inspector.check_completion_size([[1, 2, 3], "hello"])


def test_batches_report_every_prompt(inspector):
    info = inspector.completion(["Hello there", "Hi", [1, 2, 3, 4, 5]])
    assert len(info.lengths) == 3 and info.lengths[2] == 5
    assert info.tokens == max(info.lengths)
    assert inspector.completion("Hello").lengths == (inspector.completion("Hello").tokens,)
