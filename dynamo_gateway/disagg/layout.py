"""KV layouts and transfer plans: pure, no I/O.

A worker's KV pool, as every transport sees it, is one host byte array of shape
``[planes, num_blocks, page_bytes]``: ``planes = num_layers * 2`` (the key and
the value of each layer, layer-major), and a page is one block of one plane
(``block_size * num_kv_heads * head_dim`` elements of ``dtype``). The
reference engine's cache ``[layers, 2, blocks, block_size, kv_heads,
head_dim]`` is exactly that array, viewed. A block run ``[b, b + n)`` is then
``planes`` contiguous segments of ``n * page_bytes`` bytes each.

Two workers can exchange blocks only when their layouts agree on every field
below; `incompatibility()` names the first one that does not, so a refused
transfer says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

__all__ = ["DTYPE_SIZES", "BlockRun", "KvLayout", "incompatibility", "merge_runs"]

DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "uint8": 1}


class KvLayout(msgspec.Struct, frozen=True, kw_only=True):
    """What a block of KV holds, independent of how many blocks a worker has."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # a key of DTYPE_SIZES

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unknown KV dtype {self.dtype!r} (known: {sorted(DTYPE_SIZES)})")
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.block_size) < 1:
            raise ValueError(f"every KV layout dimension must be positive: {self}")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def planes(self) -> int:
        """Key and value of every layer: the leading axis of the pool array."""
        return self.num_layers * 2

    @property
    def page_bytes(self) -> int:
        """Bytes of one block of one plane."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across every plane (what a transfer moves per block)."""
        return self.planes * self.page_bytes

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: object) -> KvLayout:
        """Decode a layout from transfer params; raises ValueError if it is malformed."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"malformed KV layout {data!r}: {exc}") from None


_FIELDS = ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype")


def incompatibility(local: KvLayout, remote: KvLayout) -> str | None:
    """None when blocks of `remote` can be written into `local` as they are; else why not."""
    for name in _FIELDS:
        mine, theirs = getattr(local, name), getattr(remote, name)
        if mine != theirs:
            return f"KV layout mismatch: {name} is {theirs} on the sender, {mine} here"
    return None


class BlockRun(msgspec.Struct, frozen=True, array_like=True):
    """``length`` blocks read from ``src`` onwards into ``dst`` onwards: one transfer each."""

    src: int
    dst: int
    length: int


def merge_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[BlockRun]:
    """Pair source and destination blocks and merge pairs contiguous on both sides.

    ``[(5, 0), (6, 1), (7, 2), (9, 3)]`` becomes runs ``(5, 0, 3)`` and ``(9, 3, 1)``.
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks for {len(dst_ids)} destination blocks")
    runs: list[BlockRun] = []
    i = 0
    n = len(src_ids)
    while i < n:
        s, d = src_ids[i], dst_ids[i]
        j = i + 1
        while j < n and src_ids[j] == s + (j - i) and dst_ids[j] == d + (j - i):
            j += 1
        runs.append(BlockRun(s, d, j - i))
        i = j
    return runs
