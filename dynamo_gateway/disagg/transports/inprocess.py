"""`inprocess`: both workers in one process (the embedded `serve`); no bytes on a wire.

Each started transport puts its memory and export table in a process-wide map
under a random key; a peer with the same pid copies block runs straight from
the source pool into its own (one copy, no staging) and releases through the
source's table.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dynamo_gateway.disagg.layout import BlockRun, KvLayout
from dynamo_gateway.disagg.transport import ExportTable, KvMemory, TransportContext
from dynamo_gateway.errors import KvTransferError

__all__ = ["InprocessTransport", "copy_checked", "copy_runs"]

_PEERS: dict[str, tuple[KvMemory | None, ExportTable]] = {}

# Copies this large run in a thread, so the event loop stays free meanwhile.
THREAD_COPY_BYTES = 1 << 20


def copy_runs(src: KvMemory, dst: KvMemory, runs: Sequence[BlockRun]) -> int:
    """Copy each run's blocks of every plane from `src` into `dst`; returns bytes."""
    for run in runs:
        n = run.length
        dst.array[:, run.dst : run.dst + n] = src.array[:, run.src : run.src + n]
    return dst.run_bytes(runs)


async def copy_checked(src: KvMemory, dst: KvMemory, runs: Sequence[BlockRun]) -> int:
    """`copy_runs` after checking both sides' bounds; large copies on a thread."""
    src.check_runs(runs, side="src")
    dst.check_runs(runs, side="dst")
    if dst.run_bytes(runs) >= THREAD_COPY_BYTES:
        return await asyncio.to_thread(copy_runs, src, dst, runs)
    return copy_runs(src, dst, runs)


class InprocessTransport:
    name = "inprocess"

    def __init__(self, context: TransportContext) -> None:
        self._key = f"{context.worker_id}/{uuid.uuid4().hex[:8]}"
        self._started = False

    def allocate(self, layout: KvLayout, num_blocks: int) -> np.ndarray[Any, Any] | None:
        return None

    async def start(self, memory: KvMemory | None, exports: ExportTable) -> dict[str, Any]:
        _PEERS[self._key] = (memory, exports)
        self._started = True
        return {"pid": os.getpid(), "key": self._key}

    def can_connect(self, local: Mapping[str, Any], remote: Mapping[str, Any]) -> bool:
        return self.reachable(remote)

    @staticmethod
    def _peer(remote: Mapping[str, Any]) -> tuple[KvMemory | None, ExportTable]:
        peer = _PEERS.get(str(remote.get("key")))
        if peer is None or remote.get("pid") != os.getpid():
            raise KvTransferError(f"no in-process KV peer {remote.get('key')!r}")
        return peer

    async def read(
        self,
        remote: Mapping[str, Any],
        transfer_id: str,
        runs: Sequence[BlockRun],
        memory: KvMemory,
    ) -> int:
        src, exports = self._peer(remote)
        exports.check(transfer_id, runs)
        if src is None:
            raise KvTransferError(f"in-process peer {remote.get('key')!r} has no KV memory")
        return await copy_checked(src, memory, runs)

    async def release(self, remote: Mapping[str, Any], transfer_id: str) -> None:
        await self.release_peer(remote, transfer_id)

    @staticmethod
    def reachable(remote: Mapping[str, Any]) -> bool:
        return remote.get("pid") == os.getpid() and remote.get("key") in _PEERS

    @classmethod
    async def release_peer(cls, remote: Mapping[str, Any], transfer_id: str) -> None:
        _, exports = cls._peer(remote)
        if not exports.release(transfer_id):
            raise KvTransferError(f"transfer {transfer_id!r} expired at its source")

    async def aclose(self) -> None:
        if self._started:
            _PEERS.pop(self._key, None)
            self._started = False
