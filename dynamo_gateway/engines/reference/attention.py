"""Paged attention backends for the reference model.

A backend turns one `ForwardBatch` into a per-step `LayerAttention`: the model
calls it once per layer with the step's rotated queries and its new keys and
values; it stores the keys and values in the `PagedKVCache` and returns each new
token's attention output over its own sequence. Planning (index and mask
tensors) happens once per step in `AttentionBackend.begin`, so the per-layer
work is a handful of tensor ops with no Python loop over sequences.

`GatherSDPA` is the portable default (CPU and CUDA); a fused paged-attention
kernel can replace it by implementing the same two-method protocol.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from dynamo_gateway.engines.reference.batch import ForwardBatch
from dynamo_gateway.engines.reference.kv_cache import PagedKVCache

__all__ = ["AttentionBackend", "GatherSDPA", "LayerAttention", "make_backend"]


class LayerAttention(Protocol):
    """One step's attention, called once per layer."""

    def __call__(self, layer: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Store the new keys and values in the cache and attend.

        q: [T, heads, head_dim]; kv: [T, 2 (key | value), kv_heads, head_dim], keys
        already rotated. Returns [T, heads * head_dim].
        """
        ...


class AttentionBackend(Protocol):
    name: str

    def begin(self, batch: ForwardBatch, cache: PagedKVCache) -> LayerAttention:
        """Plan a step (indices, masks) for every layer of it to reuse."""
        ...


class _Kind(enum.Enum):
    DECODE = "decode"  # one query per sequence: GQA folded, mask [G, 1, 1, L]
    PREFILL = "prefill"  # padded queries over cached + new keys: mask [G, 1, max_q, L]
    SELF_CAUSAL = "self-causal"  # one sequence from position 0: no cache read, no mask


@dataclass
class _Group:
    """Sequences attended by one batched SDPA call.

    Keys are gathered whole blocks at a time: ``block_index`` [G * max_blocks]
    lists each sequence's blocks, padded with its own first block, so that the
    gathered row ``j`` of a sequence holds its token at position ``j`` (the
    padding lies past its context and the mask hides it).
    """

    kind: _Kind
    rows: torch.Tensor | None  # [T_g] rows of the step's tokens; None = all, in order
    num_seqs: int = 1  # G
    block_index: torch.Tensor | None = None  # [G * max_blocks] int64
    gathered: int = 0  # max_blocks * block_size
    max_keys: int = 0  # L: the longest context of the group (gathered rows past it are cut)
    mask: torch.Tensor | None = None  # additive (0 / -inf), or None when nothing is hidden
    max_q: int = 1
    pad_index: torch.Tensor | None = None  # [G * max_q] rows of T_g, padded (prefill)
    unpad_index: torch.Tensor | None = None  # [T_g] rows of the padded queries (prefill)
    buffer: torch.Tensor | None = None  # the gathered K/V, allocated by the first layer


class GatherSDPA:
    """Gather each sequence's K/V through its block table, then batched SDPA.

    Algorithm, per step:

    1. Split the sequences into decode ones (one new token) and prefill ones
       (several), so that a long prefill chunk never pads the decode queries.
    2. Per group, build once: the padded block index, and an additive mask
       [G, 1, q, L] where query position ``p`` sees gathered key ``j`` iff
       ``j <= p`` (and ``j > p - window`` for a sliding window). Because row ``j``
       is position ``j``, the causal rule also hides the padding and every slot
       past the sequence's context, and the cached context and the causal part
       of the new tokens need no separate handling.

    Per layer: ``index_copy_`` the new K/V into their slots, ``index_select`` the
    groups' blocks from the cache, and run one SDPA per group. Decode folds the
    ``n_rep`` query heads that share a KV head into the query axis
    ([G, kv_heads, n_rep, head_dim]), so GQA costs no copy of the keys. Prefill
    repeats the KV heads instead (a mask per query row would otherwise repeat
    ``n_rep`` times). A lone sequence prefilled from position 0 with no window
    (the common first chunk) skips the gather and the mask: it attends to its
    new keys with ``is_causal``.
    """

    name = "gather-sdpa"

    def __init__(
        self, *, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.n_rep = num_heads // num_kv_heads
        self.sliding_window = sliding_window

    def begin(self, batch: ForwardBatch, cache: PagedKVCache) -> LayerAttention:
        device = batch.positions.device
        if batch.is_decode:
            everyone = list(range(len(batch.query_lens)))
            return _GatherStep(self, cache, batch, [self._plan(batch, cache, everyone, None)])
        decode = [i for i, n in enumerate(batch.query_lens) if n == 1]
        prefill = [i for i, n in enumerate(batch.query_lens) if n > 1]
        starts = [0]
        for n in batch.query_lens:
            starts.append(starts[-1] + n)
        groups = []
        for members in (decode, prefill):
            if not members:
                continue
            row_index = None
            if len(members) < len(batch.query_lens):
                rows: list[int] = []
                for i in members:
                    rows.extend(range(starts[i], starts[i + 1]))
                row_index = torch.tensor(rows, dtype=torch.int64, device=device)
            groups.append(self._plan(batch, cache, members, row_index))
        return _GatherStep(self, cache, batch, groups)

    def _plan(
        self,
        batch: ForwardBatch,
        cache: PagedKVCache,
        members: list[int],
        rows: torch.Tensor | None,
    ) -> _Group:
        device = batch.positions.device
        q_lens = [batch.query_lens[i] for i in members]
        max_q = max(q_lens)
        contexts = [batch.context_lens[i] for i in members]
        if max_q > 1 and len(members) == 1 and contexts[0] == max_q and not self.sliding_window:
            return _Group(kind=_Kind.SELF_CAUSAL, rows=rows, max_q=max_q)

        tables = batch.block_tables
        max_blocks = max(len(tables[i]) for i in members)
        padded: list[int] = []
        for i in members:
            table = tables[i]
            padded.extend(table)
            padded.extend([table[0]] * (max_blocks - len(table)))
        group = _Group(
            kind=_Kind.DECODE if max_q == 1 else _Kind.PREFILL,
            rows=rows,
            num_seqs=len(members),
            block_index=torch.tensor(padded, dtype=torch.int64, device=device),
            gathered=max_blocks * cache.block_size,
            max_keys=max(contexts),
            max_q=max_q,
        )
        positions = batch.positions if rows is None else batch.positions.index_select(0, rows)
        if max_q == 1:
            if len(members) == 1 and not self.sliding_window:
                return group  # one decode query sees its whole context: no mask at all
            q_pos = positions.view(-1, 1, 1, 1)  # [G, 1, 1, 1]
        else:
            # Pad each sequence's queries to max_q with copies of its first query:
            # real positions, so that no mask row is empty (that would give NaNs).
            pad: list[int] = []
            unpad: list[int] = []
            offset = 0
            for g, n in enumerate(q_lens):
                pad.extend(range(offset, offset + n))
                pad.extend([offset] * (max_q - n))
                unpad.extend(range(g * max_q, g * max_q + n))
                offset += n
            group.pad_index = torch.tensor(pad, dtype=torch.int64, device=device)
            group.unpad_index = torch.tensor(unpad, dtype=torch.int64, device=device)
            q_pos = positions.index_select(0, group.pad_index).view(-1, 1, max_q, 1)
        keys = torch.arange(group.max_keys, dtype=torch.int64, device=device)
        visible = keys <= q_pos  # [G, 1, q, L]
        if self.sliding_window:
            visible &= keys > q_pos - self.sliding_window
        mask = torch.zeros(visible.shape, dtype=cache.dtype, device=device)
        group.mask = mask.masked_fill_(~visible, float("-inf"))
        return group


class _GatherStep:
    """`GatherSDPA`'s plan for one step; called once per layer."""

    def __init__(
        self, backend: GatherSDPA, cache: PagedKVCache, batch: ForwardBatch, groups: list[_Group]
    ) -> None:
        self.cache = cache
        self.slots = batch.slot_mapping
        self.groups = groups
        self.kv_heads = backend.num_kv_heads
        self.n_rep = backend.n_rep
        self.head_dim = backend.head_dim
        self.width = backend.num_heads * backend.head_dim

    def __call__(self, layer: int, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        # [2, num_slots, kv_heads, hd] <- [2, T, kv_heads, hd]: keys and values in one op.
        self.cache.slot_views[layer].index_copy_(1, self.slots, kv.transpose(0, 1))
        blocks = self.cache.block_views[layer]  # [2, num_blocks, block_size * kv_heads * hd]
        if len(self.groups) == 1 and self.groups[0].rows is None:
            return self._attend(self.groups[0], blocks, q, kv)
        out = q.new_empty((q.shape[0], self.width))  # [T, heads * head_dim]
        for group in self.groups:
            assert group.rows is not None
            # Only a self-causal group reads the new K/V directly; the others read the cache.
            own_kv = kv.index_select(0, group.rows) if group.kind is _Kind.SELF_CAUSAL else kv
            part = self._attend(group, blocks, q.index_select(0, group.rows), own_kv)
            out.index_copy_(0, group.rows, part)
        return out

    def _attend(
        self, group: _Group, blocks: torch.Tensor, q: torch.Tensor, kv: torch.Tensor
    ) -> torch.Tensor:
        """q: [T_g, heads, hd], kv: [T_g, 2, kv_heads, hd] -> [T_g, heads * hd]."""
        g, kvh, hd = group.num_seqs, self.kv_heads, self.head_dim
        if group.kind is _Kind.SELF_CAUSAL:
            query = q.transpose(0, 1).unsqueeze(0)  # [1, heads, T_g, hd]
            new = kv.permute(1, 2, 0, 3)  # [2, kv_heads, T_g, hd]
            out = F.scaled_dot_product_attention(
                query, new[0].unsqueeze(0), new[1].unsqueeze(0), is_causal=True, enable_gqa=True
            )
            return out[0].transpose(0, 1).reshape(-1, self.width)

        assert group.block_index is not None
        if group.buffer is None:  # one allocation per step, reused by every layer
            group.buffer = blocks.new_empty((2, group.block_index.shape[0], blocks.shape[2]))
        # [2, G * max_blocks, block_size * kv_heads * hd]
        gathered = torch.index_select(blocks, 1, group.block_index, out=group.buffer)
        gathered = gathered.view(2, g, group.gathered, kvh, hd)[:, :, : group.max_keys]
        key = gathered[0].transpose(1, 2)  # [G, kv_heads, L, hd]
        value = gathered[1].transpose(1, 2)
        if group.kind is _Kind.DECODE:
            # Heads h = kv * n_rep + r share KV head kv (the order of HF's repeat_kv).
            query = q.view(g, kvh, self.n_rep, hd)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=group.mask)
            return out.reshape(g, self.width)

        assert group.pad_index is not None and group.unpad_index is not None
        m = group.max_q
        query = q.index_select(0, group.pad_index).view(g, m, -1, hd).transpose(1, 2)
        if self.n_rep > 1:
            key = key.repeat_interleave(self.n_rep, dim=1)  # [G, heads, L, hd]
            value = value.repeat_interleave(self.n_rep, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=group.mask)
        out = out.transpose(1, 2).reshape(g * m, self.width)  # [G * max_q, heads * hd]
        return out.index_select(0, group.unpad_index)


def make_backend(
    name: str, *, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None
) -> AttentionBackend:
    """The attention backend called `name` (only ``gather-sdpa`` so far)."""
    if name == GatherSDPA.name:
        return GatherSDPA(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            sliding_window=sliding_window,
        )
    raise ValueError(f"unknown attention backend {name!r}; available: {GatherSDPA.name}")
