"""What the ingress learns from a prompt before routing it: its size in tokens and the
hashes of its leading KV blocks (for prefix affinity)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptInfo:
    tokens: int
    # (prefix length in tokens, hash of those tokens) for the first 1, 2, 4, ... blocks
    prefix_keys: tuple[tuple[int, int], ...]


class PromptInspector:
    def __init__(self, model_path: str, block_size: int, max_blocks: int) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(model_path)
        depths, d = [], 1
        while d <= max_blocks:
            depths.append(d * block_size)
            d *= 2
        self._prefix_lengths = tuple(depths)

    def chat(self, messages: list[dict[str, Any]]) -> PromptInfo:
        try:
            text = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # tool calls, multimodal parts: the text alone
            text = " ".join(str(m.get("content") or "") for m in messages)
        return self._info(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def completion(self, prompt: Any) -> PromptInfo:
        if isinstance(prompt, str):
            return self._info(self._tokenizer(prompt)["input_ids"])
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return self._info(prompt)
        if isinstance(prompt, list) and prompt:  # a batch: route by its largest member
            return max((self.completion(p) for p in prompt), key=lambda i: i.tokens)
        return PromptInfo(0, ())

    def _info(self, ids: list[int]) -> PromptInfo:
        keys = tuple((n, hash(tuple(ids[:n]))) for n in self._prefix_lengths if n <= len(ids))
        return PromptInfo(len(ids), keys)
