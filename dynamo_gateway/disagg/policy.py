"""Conditional disaggregation: pure decisions, no I/O.

Per request, after the decode worker is chosen: prefill remotely only when it
pays. A short uncached remainder is cheaper to prefill where the request will
decode than to prefill elsewhere and move its KV; a saturated prefill pool
would only queue it. Aggregated serving is always the fallback.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Decision", "LocalReason", "PrefillLoad", "decide"]


class LocalReason(enum.StrEnum):
    """Why a request prefills on its decode worker (the metric's ``reason`` label)."""

    NO_PREFILL_WORKERS = "no_prefill_workers"
    NOT_DECODE_ROLE = "not_decode_role"  # the chosen worker is aggregated, not a decode worker
    SHORT_PROMPT = "short_prompt"  # uncached tokens below disagg.min_prefill_tokens
    SINGLE_TOKEN = "single_token"  # the prefill's one token is the whole answer
    SATURATED = "prefill_saturated"  # every prefill worker has too much queued
    PREFILL_FAILED = "prefill_failed"  # the prefill leg failed or was refused


@dataclass(frozen=True, slots=True)
class Decision:
    remote: bool
    reason: LocalReason | None = None  # set when not remote


REMOTE = Decision(True)


def decide(
    *,
    prompt_tokens: int,
    cached_tokens: int,
    new_tokens_wanted: int,
    prefill_workers: int,
    decode_role: bool,
    least_queued_prefill_tokens: int,
    min_prefill_tokens: int,
    max_queued_prefill_tokens: int,
) -> Decision:
    """Remote or local prefill for one request.

    ``cached_tokens``: the prompt prefix already on the chosen decode worker (it
    would pull only the rest). ``least_queued_prefill_tokens``: prefill tokens in
    flight on the least busy prefill worker.
    """
    if prefill_workers == 0:
        return Decision(False, LocalReason.NO_PREFILL_WORKERS)
    if not decode_role:
        return Decision(False, LocalReason.NOT_DECODE_ROLE)
    if new_tokens_wanted <= 1:
        return Decision(False, LocalReason.SINGLE_TOKEN)
    if prompt_tokens - cached_tokens < min_prefill_tokens:
        return Decision(False, LocalReason.SHORT_PROMPT)
    if least_queued_prefill_tokens >= max_queued_prefill_tokens:
        return Decision(False, LocalReason.SATURATED)
    return REMOTE


class PrefillLoad:
    """Prefill tokens each prefill worker has in flight from this frontend."""

    def __init__(self) -> None:
        self._tokens: dict[str, int] = {}
        self._requests: dict[str, tuple[str, int]] = {}

    def add(self, request_id: str, worker_id: str, tokens: int) -> None:
        self._requests[request_id] = (worker_id, tokens)
        self._tokens[worker_id] = self._tokens.get(worker_id, 0) + tokens

    def done(self, request_id: str) -> None:
        entry = self._requests.pop(request_id, None)
        if entry is not None:
            wid, tokens = entry
            self._tokens[wid] -= tokens

    def queued(self, worker_id: str) -> int:
        return self._tokens.get(worker_id, 0)

    def least(self, worker_ids: list[str]) -> int:
        return min((self.queued(w) for w in worker_ids), default=0)

    def remove_worker(self, worker_id: str) -> None:
        self._tokens.pop(worker_id, None)
        for rid in [r for r, (w, _) in self._requests.items() if w == worker_id]:
            del self._requests[rid]
