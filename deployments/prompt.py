"""What the ingress learns from a prompt before routing it: its size in tokens and the
hashes of its leading KV blocks (for prefix affinity).

A prompt far longer than the context is refused before it is tokenized: no token of the
vocabulary spans more than `max_token_bytes` bytes, so a text of more than
`max_model_len x max_token_bytes` bytes has more tokens than the context holds, whatever
the tokenizer makes of it. (A 32 MB prompt took 39 s of tokenization on the ingress's
event loop before this check.) The callers run the rest in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class PromptTooLong(Exception):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclass(frozen=True)
class PromptInfo:
    tokens: int
    # (prefix length in tokens, hash of those tokens) for the first 1, 2, 4, ... blocks
    prefix_keys: tuple[tuple[int, int], ...]
    # Each prompt's length when the request is a batch of prompts.
    batch: tuple[int, ...] = ()

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.batch or (self.tokens,)


class PromptInspector:
    def __init__(self, model_path: str, block_size: int, max_blocks: int,
                 max_model_len: int) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(model_path)
        depths, d = [], 1
        while d <= max_blocks:
            depths.append(d * block_size)
            d *= 2
        self._prefix_lengths = tuple(depths)
        self.max_model_len = max_model_len
        # Byte-level vocabularies spell a byte with up to 2 UTF-8 bytes, so this overstates
        # a token's reach: the bound only ever lets more through to the exact count.
        self.max_token_bytes = max(len(t.encode()) for t in self._tokenizer.get_vocab())
        self._max_prompt_bytes = max_model_len * self.max_token_bytes

    # -- the cheap bound, on the event loop ----------------------------------------------

    def check_chat_size(self, messages: list[Any]) -> None:
        # Chat templates mark every message with at least one token (its role).
        if len(messages) > self.max_model_len:
            raise PromptTooLong(f"messages: {len(messages)} messages are more tokens than "
                                f"this model's context of {self.max_model_len}", "messages")
        self._check_bytes(sum(_text_bytes(m.get("content")) for m in messages
                              if isinstance(m, dict)), "messages")

    def check_completion_size(self, prompt: Any) -> None:
        if isinstance(prompt, str):
            self._check_bytes(len(prompt.encode()), "prompt")
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            if len(prompt) > self.max_model_len:
                raise PromptTooLong(f"prompt has {len(prompt)} tokens; this model's context "
                                    f"is {self.max_model_len} tokens", "prompt")
        elif isinstance(prompt, list):
            for p in prompt:
                self.check_completion_size(p)

    def _check_bytes(self, n_bytes: int, param: str) -> None:
        if n_bytes > self._max_prompt_bytes:
            raise PromptTooLong(
                f"{param}: {n_bytes} bytes of text are more than {self.max_model_len} tokens, "
                f"this model's context", param)

    # -- exact counts (run in a worker thread) -------------------------------------------

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
            infos = [self.completion(p) for p in prompt]
            largest = max(infos, key=lambda i: i.tokens)
            return PromptInfo(largest.tokens, largest.prefix_keys,
                              tuple(i.tokens for i in infos))
        return PromptInfo(0, ())

    def _info(self, ids: list[int]) -> PromptInfo:
        keys = tuple((n, hash(tuple(ids[:n]))) for n in self._prefix_lengths if n <= len(ids))
        return PromptInfo(len(ids), keys)


def _text_bytes(content: Any) -> int:
    """UTF-8 bytes of a message's text (never more than the template will tokenize)."""
    if isinstance(content, str):
        return len(content.encode())
    if isinstance(content, list):
        return sum(len(p["text"].encode()) for p in content
                   if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0
