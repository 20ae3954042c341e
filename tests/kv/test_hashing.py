"""Block hashing against vectors computed independently, byte by byte."""

from __future__ import annotations

import struct

import xxhash
from hypothesis import given
from hypothesis import strategies as st

from dynamo_gateway.kv.hashing import block_hashes, chain_hash, local_block_hashes, sequence_hashes


def _reference(tokens: list[int], block_size: int) -> list[int]:
    out: list[int] = []
    parent: int | None = None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        data = b"".join(struct.pack("<I", t) for t in tokens[start : start + block_size])
        local = xxhash.xxh3_64_intdigest(data, seed=1337)
        parent = (
            local
            if parent is None
            else xxhash.xxh3_64_intdigest(
                struct.pack("<Q", parent) + struct.pack("<Q", local), 1337
            )
        )
        out.append(parent)
    return out


def test_fixed_vector() -> None:
    tokens = list(range(1, 9))
    first = xxhash.xxh3_64_intdigest(struct.pack("<4I", 1, 2, 3, 4), seed=1337)
    second_local = xxhash.xxh3_64_intdigest(struct.pack("<4I", 5, 6, 7, 8), seed=1337)
    assert local_block_hashes(tokens, 4) == [first, second_local]
    second = xxhash.xxh3_64_intdigest(struct.pack("<QQ", first, second_local), seed=1337)
    assert sequence_hashes(tokens, 4) == [first, second]


def test_partial_block_is_not_hashed() -> None:
    assert sequence_hashes([1, 2, 3], 4) == []
    assert len(sequence_hashes(list(range(11)), 4)) == 2


def test_prefix_property_and_continuation() -> None:
    a = sequence_hashes(list(range(64)), 16)
    b = sequence_hashes(list(range(48)) + [999] * 16, 16)
    assert a[:3] == b[:3] and a[3] != b[3]
    head = sequence_hashes(list(range(32)), 16)
    tail = sequence_hashes(list(range(32, 64)), 16, parent=head[-1])
    assert head + tail == a
    locals_, seqs = block_hashes(list(range(64)), 16)
    assert seqs == a and chain_hash(None, locals_[0]) == a[0]


@given(st.lists(st.integers(0, 2**32 - 1), max_size=200), st.integers(1, 17))
def test_matches_reference(tokens: list[int], block_size: int) -> None:
    assert sequence_hashes(tokens, block_size) == _reference(tokens, block_size)
