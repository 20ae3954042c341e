"""Block hashing, compatible with NVIDIA Dynamo's KV router.

Tokens are cut into full blocks of ``block_size`` (a trailing partial block is
not hashed). Each block's *local* hash is xxh3_64 (seed 1337) of its tokens as
little-endian u32; *sequence* hashes chain them so that a block's hash names its
whole prefix::

    seq[0] = local[0]
    seq[i] = xxh3_64(LE64(seq[i-1]) || LE64(local[i]), seed=1337)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import xxhash

SEED = 1337

_xxh3 = xxhash.xxh3_64_intdigest
_pack_pair = struct.Struct("<QQ").pack


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype="<u4").tobytes()


def local_block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """Local hash of each full block."""
    n_full = len(tokens) // block_size
    if n_full == 0:
        return []
    data = _token_bytes(tokens[: n_full * block_size])
    step = 4 * block_size
    return [_xxh3(data[i : i + step], SEED) for i in range(0, n_full * step, step)]


def chain_hash(parent: int | None, local: int) -> int:
    """Sequence hash of a block whose prefix ends in `parent` (None for the first block)."""
    if parent is None:
        return local
    return _xxh3(_pack_pair(parent, local), SEED)


def sequence_hashes(tokens: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Sequence hash of each full block; `parent` continues an earlier chain."""
    out: list[int] = []
    for local in local_block_hashes(tokens, block_size):
        parent = chain_hash(parent, local)
        out.append(parent)
    return out


def block_hashes(tokens: Sequence[int], block_size: int) -> tuple[list[int], list[int]]:
    """(local hashes, sequence hashes) of every full block."""
    locals_ = local_block_hashes(tokens, block_size)
    seqs: list[int] = []
    parent: int | None = None
    for local in locals_:
        parent = chain_hash(parent, local)
        seqs.append(parent)
    return locals_, seqs
