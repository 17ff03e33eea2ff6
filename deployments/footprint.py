"""What a request will hold in the engines: its sequences and their KV tokens.

vLLM runs a request as one sequence per prompt and per sample (`n`, or `best_of` where
the version still has it; a batched completion's prompts each get that many), and each
sequence may hold its prompt plus up to `max_tokens` KV tokens. Admission and routing
charge exactly that, so neither `n: 10000` nor a batch of prompts passes as one small
request.

An omitted `max_tokens` means, to vLLM, "up to the end of the context". Charging that
would make every such request look like a full-context one; instead the configured
`admission.default_output_tokens` is sent to the engine as the request's `max_tokens`,
so the charge is what the engine may really generate. Where it would not fit the
context (or is unset), vLLM's default stands and the context remainder is charged.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Footprint:
    sequences: int
    prompt_tokens: int  # summed over sequences
    output_tokens: int  # summed over sequences, at most what the engine may generate
    max_tokens_for_engine: int | None  # set in the body when the client left it out

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


def request_footprint(prompt_lengths: list[int], samples: int, max_tokens: int | None,
                      max_model_len: int, default_output_tokens: int | None) -> Footprint:
    """`samples` is max(n, best_of); `max_tokens` as the client gave it (None: omitted)."""
    told = None
    if max_tokens is None:
        longest = max(prompt_lengths, default=0)
        if default_output_tokens is not None and longest + default_output_tokens <= max_model_len:
            told = max_tokens = default_output_tokens
    outputs = [max_tokens if max_tokens is not None else max(0, max_model_len - p)
               for p in prompt_lengths]
    return Footprint(sequences=samples * len(prompt_lengths),
                     prompt_tokens=samples * sum(prompt_lengths),
                     output_tokens=samples * sum(outputs),
                     max_tokens_for_engine=told)
