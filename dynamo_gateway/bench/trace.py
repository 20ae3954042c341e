"""Mooncake-format request traces: loading, arrival schedules and prompt synthesis.

A trace is JSON lines ``{"timestamp": ms, "input_length": n, "output_length": m,
"hash_ids": [...]}``; each hash id names one ``trace_block_size``-token block of the
prompt, equal ids meaning identical blocks (a shared leading run is a shared prefix).

Prompts are synthesised so that this holds for real token ids: a hash id is turned into
``trace_block_size`` ids drawn from a generator seeded by ``(seed, hash_id)``, so equal
ids give equal blocks wherever they appear and different ids give (with overwhelming
probability) different blocks. The prompt is the concatenation cut to ``input_length``;
a trace whose ``input_length`` runs past its blocks is padded with request-unique blocks.

Everything here is pure: no I/O besides :func:`load_trace` reading the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_TRACE_BLOCK_SIZE",
    "PromptSynthesizer",
    "TraceRequest",
    "arrival_offsets",
    "load_trace",
]

#: Tokens per hash id in the Mooncake traces.
DEFAULT_TRACE_BLOCK_SIZE = 512

# Keeps padding blocks (for prompts longer than their hash ids) apart from trace ids.
_PAD_DOMAIN = 0x5EED_0000_0000


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One line of a trace."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Read a Mooncake JSONL trace (at most ``limit`` requests), sorted by timestamp.

    Raises :class:`ValueError` with the line number for a malformed line.
    """
    out: list[TraceRequest] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(out) >= limit:
                break
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                req = TraceRequest(
                    timestamp_ms=float(row["timestamp"]),
                    input_length=int(row["input_length"]),
                    output_length=int(row["output_length"]),
                    hash_ids=tuple(int(h) for h in row.get("hash_ids", ())),
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a trace line ({exc!r})") from None
            if req.input_length < 1 or req.output_length < 1:
                raise ValueError(f"{path}:{lineno}: input and output lengths must be >= 1")
            out.append(req)
    out.sort(key=lambda r: r.timestamp_ms)  # stable: equal timestamps keep file order
    return out


def arrival_offsets(requests: Sequence[TraceRequest], time_scale: float) -> list[float]:
    """Seconds after the first request at which each request is sent.

    ``time_scale`` divides the trace's gaps: ``arrival_speedup * speedup``.
    """
    if time_scale <= 0:
        raise ValueError("time_scale must be > 0")
    if not requests:
        return []
    t0 = requests[0].timestamp_ms
    return [(r.timestamp_ms - t0) / 1000.0 / time_scale for r in requests]


class PromptSynthesizer:
    """Token ids for trace requests: equal hash ids give equal token blocks."""

    def __init__(
        self,
        vocab_size: int,
        trace_block_size: int = DEFAULT_TRACE_BLOCK_SIZE,
        *,
        seed: int = 0,
        cache_blocks: int = 4096,
    ) -> None:
        if vocab_size < 2:
            raise ValueError("vocab_size must be >= 2")
        if trace_block_size < 1:
            raise ValueError("trace_block_size must be >= 1")
        self.vocab_size = vocab_size
        self.trace_block_size = trace_block_size
        self.seed = seed
        # Hot shared prefixes (system prompts, earlier turns) recur: keep recent blocks.
        self._block = lru_cache(maxsize=cache_blocks)(self._make_block)

    def _make_block(self, hash_id: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, hash_id])
        block = rng.integers(0, self.vocab_size, self.trace_block_size, dtype=np.int64)
        block.flags.writeable = False
        return block

    def block(self, hash_id: int) -> np.ndarray:
        """The ``trace_block_size`` token ids of one hash id (read-only)."""
        if hash_id < 0:
            raise ValueError(f"hash ids are non-negative, got {hash_id}")
        result: np.ndarray = self._block(hash_id)
        return result

    def prompt(self, hash_ids: Iterable[int], input_length: int, pad_key: int = 0) -> list[int]:
        """The prompt: blocks of ``hash_ids`` concatenated, cut to ``input_length``.

        If the blocks are too short, request-unique padding blocks (keyed by
        ``pad_key``, e.g. the request's index) fill the rest.
        """
        bs = self.trace_block_size
        needed = -(-input_length // bs)
        parts = [self.block(h) for h in list(hash_ids)[:needed]]
        for i in range(needed - len(parts)):
            parts.append(self._make_block(_PAD_DOMAIN + pad_key * 1_000_003 + i))
        if not parts:
            return []
        ids: list[int] = np.concatenate(parts)[:input_length].tolist()
        return ids

    def request_prompt(self, request: TraceRequest, index: int = 0) -> list[int]:
        """`prompt` for one trace request (``index`` keys its padding, if any)."""
        return self.prompt(request.hash_ids, request.input_length, pad_key=index)
