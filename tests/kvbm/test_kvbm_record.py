"""Block records: a torn, rotten or stale block is never read back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dynamo_gateway.disagg.layout import KvLayout
from dynamo_gateway.kvbm.record import HEADER, BadRecord, decode, encode, namespace_of

LAYOUT = KvLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype="float32")
NS = namespace_of("smol", LAYOUT)
PAYLOAD = bytes(range(256)) * (LAYOUT.block_bytes // 256)


def test_round_trip() -> None:
    data = encode(NS, 42, memoryview(PAYLOAD))
    assert len(data) == HEADER.size + len(PAYLOAD)
    assert bytes(decode(data, NS, 42, len(PAYLOAD))) == PAYLOAD


def test_namespaces_differ_by_model_and_layout() -> None:
    other = KvLayout(num_layers=2, num_kv_heads=2, head_dim=4, block_size=8, dtype="float32")
    assert len({NS, namespace_of("other", LAYOUT), namespace_of("smol", other)}) == 3


@pytest.mark.parametrize(
    ("mangle", "says"),
    [
        (lambda d: d[: len(d) // 2], "truncated"),
        (lambda d: d[:10], "truncated record: 10 bytes"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum mismatch"),
        (lambda d: b"XXXX" + d[4:], "not a block record"),
        (lambda d: encode(namespace_of("other", LAYOUT), 42, memoryview(PAYLOAD)), "stale"),
        (lambda d: encode(NS, 43, memoryview(PAYLOAD)), "holds block"),
        (lambda d: encode(NS, 42, memoryview(PAYLOAD[:-4])), "payload bytes"),
    ],
    ids=["torn", "header-only", "bit-flip", "garbage", "other-model", "other-hash", "short"],
)
def test_bad_records_are_rejected(mangle: Callable[[bytes], bytes], says: str) -> None:
    data = mangle(encode(NS, 42, memoryview(PAYLOAD)))
    with pytest.raises(BadRecord, match=says):
        decode(data, NS, 42, len(PAYLOAD))
