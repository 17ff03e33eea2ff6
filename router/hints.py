"""What the ingress tells the request router (and the replica) about a request, so the
router never parses an OpenAI body on its hot path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HINTS_KWARG = "hints"


@dataclass(frozen=True)
class RoutingHints:
    # Totals over the request's sequences (n or best_of, times a batch's prompts).
    prompt_tokens: int = 0
    max_tokens: int = 0
    sequences: int = 1
    model: str = ""
    adapter: str | None = None  # LoRA adapter name when `model` names one
    adapter_path: str | None = None  # where the replica loads it from (validated)
    session_id: str | None = None
    # (length, hash) of the prompt's first 1, 2, 4, ... KV blocks, shortest first
    prefix_keys: tuple[tuple[int, int], ...] = ()
    tenant: str | None = None
    # Set on a request sent again because the replica it first reached answered that its
    # engine had died (ReplyHead.engine_dead): that replica's unique_id. The router leaves
    # it out of this and later choices (router/placement_router.py).
    avoid_replica: str | None = None

    @property
    def predicted_tokens(self) -> int:
        """Tokens the request may hold in the KV cache at its largest."""
        return self.prompt_tokens + self.max_tokens


def hints_of(pending_request: Any) -> RoutingHints | None:
    """The hints of a call: its `hints` keyword, else its first argument's `hints` (the
    replica's typed request envelope, deployments/protocol.py: EngineRequest)."""
    if pending_request is None:
        return None
    hints = pending_request.kwargs.get(HINTS_KWARG)
    if hints is None and pending_request.args:
        hints = getattr(pending_request.args[0], HINTS_KWARG, None)
    return hints if isinstance(hints, RoutingHints) else None
