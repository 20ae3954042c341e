"""KV cache events: what an engine tells routers about the blocks it holds.

Hashes are our sequence hashes (see `dynamo_gateway.kv.hashing`): equal prefixes
give equal hashes on every worker, so a router can index blocks across workers.
Each worker numbers its events with a monotonically increasing `event_id`; a
consumer that sees a gap asks for a full dump.
"""

from __future__ import annotations

import msgspec


class BlockStored(msgspec.Struct, frozen=True, tag="stored", kw_only=True):
    """Full blocks were written; `block_hashes[0]` continues `parent_block_hash`."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    medium: str = "GPU"


class BlockRemoved(msgspec.Struct, frozen=True, tag="removed", kw_only=True):
    """Blocks were evicted from `medium`."""

    block_hashes: list[int]
    medium: str = "GPU"


class AllBlocksCleared(msgspec.Struct, frozen=True, tag="cleared", kw_only=True):
    """The worker dropped its whole cache (restart, reset)."""


KvEventData = BlockStored | BlockRemoved | AllBlocksCleared


class KvEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event from one worker, in that worker's order."""

    worker_id: str
    event_id: int
    data: KvEventData
