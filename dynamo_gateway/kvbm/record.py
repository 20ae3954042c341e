"""How a KV block is framed in a tier that can tear, rot or go stale (disk, a remote store).

A record is a fixed header and the block's bytes::

    magic "DGKV" | version u16 | flags u16 | namespace u64 | block hash u64
    | payload length u64 | payload xxh3_64 u64 | payload

all little-endian. ``namespace`` names what the bytes mean (model, KV layout,
block size: `namespace_of`), so a block written by another model, another dtype
or another block size is stale here even under the same sequence hash.
`decode` returns the payload only when every field checks out; anything else
(a torn write, a flipped bit, a different model's block, a file renamed onto
another hash) raises `BadRecord` and the caller recomputes the block.
"""

from __future__ import annotations

import struct

import xxhash

from dynamo_gateway.disagg.layout import KvLayout

__all__ = ["HEADER", "BadRecord", "decode", "encode", "namespace_of"]

MAGIC = b"DGKV"
VERSION = 1
HEADER = struct.Struct("<4sHHQQQQ")


class BadRecord(ValueError):
    """A stored block that must not be used (the message says why)."""


def namespace_of(model: str, layout: KvLayout) -> int:
    """A 64-bit name for blocks of `model` in `layout`: equal only if both are."""
    key = (
        f"{model}|{layout.num_layers}|{layout.num_kv_heads}|{layout.head_dim}"
        f"|{layout.block_size}|{layout.dtype}"
    )
    return xxhash.xxh3_64_intdigest(key.encode())


def encode(namespace: int, block_hash: int, payload: bytes | memoryview) -> bytes:
    """The record of one block (a copy of `payload` behind the header)."""
    view = memoryview(payload).cast("B")
    header = HEADER.pack(
        MAGIC, VERSION, 0, namespace, block_hash, view.nbytes, xxhash.xxh3_64_intdigest(view)
    )
    return header + view


def decode(
    record: bytes | memoryview, namespace: int, block_hash: int, payload_bytes: int
) -> memoryview:
    """The payload of `record` if it is block `block_hash` of `namespace`, whole and intact."""
    view = memoryview(record).cast("B")
    if view.nbytes < HEADER.size:
        raise BadRecord(f"truncated record: {view.nbytes} bytes, the header alone is {HEADER.size}")
    magic, version, _flags, ns, h, length, digest = HEADER.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        raise BadRecord(f"not a block record (magic {magic!r}, version {version})")
    if ns != namespace:
        raise BadRecord(f"stale record: namespace {ns:#x}, expected {namespace:#x}")
    if h != block_hash:
        raise BadRecord(f"record holds block {h:#x}, expected {block_hash:#x}")
    if length != payload_bytes:
        raise BadRecord(f"record of {length} payload bytes, a block here is {payload_bytes}")
    payload = view[HEADER.size :]
    if payload.nbytes != length:
        raise BadRecord(f"truncated record: {payload.nbytes} of {length} payload bytes")
    if xxhash.xxh3_64_intdigest(payload) != digest:
        raise BadRecord("checksum mismatch: the block's bytes changed after it was written")
    return payload
