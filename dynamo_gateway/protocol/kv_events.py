"""KV cache events: what an engine tells routers about the blocks it holds.

Hashes are our sequence hashes (see `dynamo_gateway.kv.hashing`): equal prefixes
give equal hashes on every worker, so a router can index blocks across workers.
Each worker numbers its events with a monotonically increasing `event_id`; a
consumer that sees a gap asks for a full dump (`KvSnapshot`).
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


class KvSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A full dump of one worker's cached blocks, for a consumer that lost events.

    It reflects every event up to and including `event_id` (the id of the last
    event the worker published before taking it) and nothing later: a consumer
    forgets its view of the worker, stores `blocks` and goes on with the events
    whose ids follow `event_id`. Replaying `blocks` into an empty view gives
    exactly the worker's cached hashes, a parent before its children where the
    parent is still cached.
    """

    worker_id: str
    event_id: int
    blocks: list[BlockStored]
