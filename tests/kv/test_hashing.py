"""Block hashing against vectors computed independently, byte by byte."""

from __future__ import annotations

import struct
from array import array

import numpy as np
import pytest
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


def _independent(tokens: list[int], block_size: int) -> tuple[list[int], list[int]]:
    """Local and sequence hashes, computed with struct + xxhash only."""
    locals_: list[int] = []
    seqs: list[int] = []
    for b in range(len(tokens) // block_size):
        block = tokens[b * block_size : (b + 1) * block_size]
        local = xxhash.xxh3_64_intdigest(struct.pack(f"<{block_size}I", *block), seed=1337)
        locals_.append(local)
        if not seqs:
            seqs.append(local)
        else:
            seqs.append(xxhash.xxh3_64_intdigest(struct.pack("<QQ", seqs[-1], local), seed=1337))
    return locals_, seqs


@pytest.mark.parametrize(
    ("tokens", "block_size"),
    [
        ([0] * 16, 16),
        ([2**32 - 1] * 33, 16),  # max u32, and a trailing partial block of one token
        (list(range(1000, 1130)), 64),  # 2 full blocks + 2 tokens
        ([7, 300000, 42, 151643, 9], 2),
        (list(range(5000)), 1),
    ],
)
def test_vectors_against_independent_computation(tokens: list[int], block_size: int) -> None:
    want_locals, want_seqs = _independent(tokens, block_size)
    assert len(want_seqs) == len(tokens) // block_size
    assert local_block_hashes(tokens, block_size) == want_locals
    assert sequence_hashes(tokens, block_size) == want_seqs
    assert block_hashes(tokens, block_size) == (want_locals, want_seqs)


def test_known_constant() -> None:
    # Pinned once from xxhash directly, so that a change in the byte layout fails loudly.
    want = xxhash.xxh3_64_intdigest(bytes([1, 0, 0, 0, 2, 0, 0, 0]), seed=1337)
    assert sequence_hashes([1, 2], 2) == [want]
    assert sequence_hashes([1, 2, 3], 2) == [want]  # the partial block [3] is not hashed


def test_input_types_agree() -> None:
    tokens = [5, 0, 2**32 - 1, 77, 123456, 9, 9, 9, 1]
    want = sequence_hashes(tokens, 4)
    assert sequence_hashes(tuple(tokens), 4) == want
    assert sequence_hashes(array("I", tokens), 4) == want
    assert sequence_hashes(np.array(tokens, dtype=np.uint32), 4) == want
    assert sequence_hashes(np.array(tokens, dtype=np.int64), 4) == want
    assert sequence_hashes(np.array(tokens, dtype=np.int64)[:8], 4) == want


@pytest.mark.parametrize("bad", [[-1, 0], [2**32, 0]])
def test_out_of_range_tokens_raise(bad: list[int]) -> None:
    with pytest.raises(OverflowError):
        sequence_hashes(bad, 2)
    with pytest.raises(OverflowError):
        sequence_hashes(np.array(bad, dtype=np.int64), 2)


def test_block_hashes_continues_a_chain() -> None:
    tokens = list(range(96))
    _, full = block_hashes(tokens, 16)
    locals_, tail = block_hashes(tokens[32:], 16, parent=full[1])
    assert tail == full[2:] and locals_ == local_block_hashes(tokens, 16)[2:]
