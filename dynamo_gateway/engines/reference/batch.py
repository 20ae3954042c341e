"""One model step's input: the new tokens of several sequences over a paged KV cache.

The engine describes each sequence by a `SeqInput` (its new tokens, where they
start, and the block table that holds its context) and `ForwardBatch.build`
flattens them into the tensors the model consumes. Token ``i`` of a sequence
sits at absolute position ``start_pos + i`` and its K/V goes to slot
``block_table[pos // block_size] * block_size + pos % block_size`` of the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ForwardBatch", "SeqInput"]


@dataclass(frozen=True)
class SeqInput:
    """One sequence's share of a step."""

    token_ids: Sequence[int]  # the new tokens of this sequence this step
    start_pos: int  # position of token_ids[0] (== tokens already in the cache)
    block_table: Sequence[int]  # block ids covering start_pos + len(token_ids) tokens
    want_logits: bool = True  # False for a non-final prefill chunk


@dataclass
class ForwardBatch:
    """Flattened step input (see the module docstring for the slot rule)."""

    token_ids: torch.Tensor  # [T] int64: new tokens of every sequence, in batch order
    positions: torch.Tensor  # [T] int64: absolute position of each new token
    slot_mapping: torch.Tensor  # [T] int64: KV slot = block_id * block_size + offset
    query_lens: list[int]  # per sequence: new tokens this step (sum == T)
    context_lens: list[int]  # per sequence: cached + new tokens after this step
    block_tables: list[list[int]]  # per sequence: exactly the blocks covering context_lens
    logits_indices: torch.Tensor  # [S'] int64: rows of T whose logits are wanted

    @property
    def num_tokens(self) -> int:
        return len(self.positions)

    @property
    def is_decode(self) -> bool:
        """True when every sequence brings exactly one new token (the hot path)."""
        return len(self.query_lens) == len(self.positions)

    @classmethod
    def build(
        cls, *, seqs: Sequence[SeqInput], block_size: int, device: torch.device
    ) -> ForwardBatch:
        """Flatten `seqs`; a ValueError if one is empty or its block table is too short.

        Block tables are trimmed to the blocks that `context_lens` needs, so that
        attention never looks at blocks a sequence reserved for later tokens.
        The returned logits follow the sequences with ``want_logits``, in batch order:
        row ``j`` of `ReferenceModel.forward`'s result is the last token of the
        ``j``-th such sequence.
        """
        if not seqs:
            raise ValueError("a forward batch needs at least one sequence")
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        logits_rows: list[int] = []
        for n, seq in enumerate(seqs):
            q_len = len(seq.token_ids)
            start = seq.start_pos
            if q_len == 0:
                raise ValueError(f"sequence {n} has no new tokens")
            if start < 0:
                raise ValueError(f"sequence {n} has a negative start_pos")
            ctx = start + q_len
            n_blocks = -(-ctx // block_size)
            if len(seq.block_table) < n_blocks:
                raise ValueError(
                    f"sequence {n}: block table of {len(seq.block_table)} blocks cannot "
                    f"hold {ctx} tokens at block size {block_size}"
                )
            table = list(seq.block_table[:n_blocks])
            tokens.extend(seq.token_ids)
            if q_len == 1:  # decode: skip the range machinery
                positions.append(start)
                slots.append(table[start // block_size] * block_size + start % block_size)
            else:
                positions.extend(range(start, ctx))
                slots.extend(
                    table[pos // block_size] * block_size + pos % block_size
                    for pos in range(start, ctx)
                )
            query_lens.append(q_len)
            context_lens.append(ctx)
            tables.append(table)
            if seq.want_logits:
                logits_rows.append(len(tokens) - 1)
        # One host tensor, one copy to the device: fewer transfers than four.
        host = torch.tensor([tokens, positions, slots], dtype=torch.int64)
        device = torch.device(device)
        if device.type != "cpu":
            host = host.pin_memory().to(device, non_blocking=True)
        return cls(
            token_ids=host[0],
            positions=host[1],
            slot_mapping=host[2],
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=tables,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64, device=device),
        )
