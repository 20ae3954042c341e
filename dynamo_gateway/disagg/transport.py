"""The KV-transport contract: how one worker's KV blocks reach another's.

A transport plugin registers a factory through
``dynamo_gateway_register_kv_transports``; ``factory(context: TransportContext)``
builds one worker's instance. The model is *pull*: the prefill worker keeps the
blocks of a finished prefill pinned (an `Export`) and advertises how to reach
them; the decode worker reads them into blocks of its own pool, then tells the
prefill worker it is done (`release`), which unpins them.

Memory: every transport sees a worker's KV pool as one host byte array,
`KvMemory` (``[planes, num_blocks, page_bytes]``, see `disagg.layout`). A
transport that needs the pool in special memory (shared memory, memory
registered with a NIC) says so in `allocate()`; the engine then builds its
cache on that array, so reads are one-sided and never stage through a copy.

Lifecycle of one instance::

    array = transport.allocate(layout, num_blocks)     # None: plain memory is fine
    descriptor = await transport.start(memory, exports)  # JSON-able, sent to peers
    transport.can_connect(descriptor, peer_descriptor)  # may this pair use it?
    await transport.read(peer_descriptor, transfer_id, runs, memory)  # decode side
    await transport.release(peer_descriptor, transfer_id)            # decode side
    await transport.aclose()

`memory` is None on an engine without real KV (the mocker): such a worker
still exports and releases, it just moves no bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from dynamo_gateway.disagg.layout import BlockRun, KvLayout
from dynamo_gateway.errors import KvTransferError

if TYPE_CHECKING:
    from dynamo_gateway.settings import Settings

__all__ = [
    "Export",
    "ExportTable",
    "KvMemory",
    "KvTransport",
    "KvTransportFactory",
    "TransportContext",
]


class KvMemory:
    """One worker's KV pool as host bytes ``[planes, num_blocks, page_bytes]``."""

    def __init__(self, layout: KvLayout, array: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
        if array.dtype != np.uint8 or array.ndim != 3:
            raise ValueError(
                f"KV memory must be a 3-D uint8 array, got {array.dtype} {array.shape}"
            )
        if array.shape[0] != layout.planes or array.shape[2] != layout.page_bytes:
            raise ValueError(f"KV memory of shape {array.shape} does not match {layout}")
        self.layout = layout
        self.array = array
        self.num_blocks = int(array.shape[1])

    @classmethod
    def zeros(cls, layout: KvLayout, num_blocks: int) -> KvMemory:
        return cls(layout, np.zeros((layout.planes, num_blocks, layout.page_bytes), np.uint8))

    def check_runs(self, runs: Sequence[BlockRun], *, side: str) -> None:
        """Raise `KvTransferError` if a run leaves the pool (``side``: "src" or "dst")."""
        for run in runs:
            start = run.src if side == "src" else run.dst
            if run.length < 1 or start < 0 or start + run.length > self.num_blocks:
                raise KvTransferError(
                    f"block run {run} is outside this pool of {self.num_blocks} blocks"
                )

    def run_bytes(self, runs: Sequence[BlockRun]) -> int:
        return sum(run.length for run in runs) * self.layout.block_bytes


@dataclass
class Export:
    """The pinned blocks of one finished prefill, waiting to be pulled."""

    transfer_id: str
    block_ids: tuple[int, ...]
    num_tokens: int
    deadline: float  # time.monotonic() after which the blocks are freed anyway
    release: Callable[[], None]  # unpins the blocks; call on the engine's event loop


class ExportTable:
    """A worker's exports by transfer id, shared by its transports (source side).

    Lookups are safe from any thread; `release()` hands the unpinning to the
    event loop the table was created on, since the block pool lives there.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._exports: dict[str, Export] = {}
        self.on_release: Callable[[Export, str], None] | None = None  # (export, why)

    def __len__(self) -> int:
        return len(self._exports)

    @property
    def pinned_blocks(self) -> int:
        return sum(len(e.block_ids) for e in self._exports.values())

    def add(self, export: Export) -> None:
        self._exports[export.transfer_id] = export

    def get(self, transfer_id: str) -> Export:
        export = self._exports.get(transfer_id)
        if export is None or export.deadline < time.monotonic():
            raise KvTransferError(f"transfer {transfer_id!r} is unknown or expired here")
        return export

    def check(self, transfer_id: str, runs: Sequence[BlockRun]) -> Export:
        """The export, if every run's source blocks belong to it; else `KvTransferError`."""
        export = self.get(transfer_id)
        owned = set(export.block_ids)
        for run in runs:
            if any(b not in owned for b in range(run.src, run.src + run.length)):
                raise KvTransferError(f"transfer {transfer_id!r} does not own blocks of {run}")
        return export

    def release(self, transfer_id: str, why: str = "pulled") -> bool:
        """Unpin an export; False if it was not (or no longer) here. Any thread."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            if transfer_id not in self._exports:
                return False
            self._loop.call_soon_threadsafe(self.release, transfer_id, why)
            return True
        export = self._exports.pop(transfer_id, None)
        if export is None:
            return False
        export.release()
        if self.on_release is not None:
            self.on_release(export, why)
        return True

    def expire(self, now: float | None = None) -> int:
        """Release every export past its deadline (on the loop); returns how many."""
        now = time.monotonic() if now is None else now
        expired = [tid for tid, e in self._exports.items() if e.deadline < now]
        for tid in expired:
            self.release(tid, "expired")
        return len(expired)

    def release_all(self) -> None:
        for tid in list(self._exports):
            self.release(tid, "shutdown")


@dataclass(frozen=True)
class TransportContext:
    """What a transport factory gets to build one worker's transport."""

    settings: Settings
    worker_id: str
    layout: KvLayout
    host: str = "127.0.0.1"  # where a transport's listener binds
    advertise_host: str | None = None  # what peers connect to (default: host)


@runtime_checkable
class KvTransport(Protocol):
    """One worker's end of a KV transport (see the module docstring)."""

    name: str

    def allocate(self, layout: KvLayout, num_blocks: int) -> np.ndarray[Any, Any] | None:
        """The pool's memory, if this transport needs it special; None otherwise."""
        ...

    async def start(self, memory: KvMemory | None, exports: ExportTable) -> dict[str, Any]:
        """Expose this worker's exports; returns the descriptor peers reach it with."""
        ...

    def can_connect(self, local: Mapping[str, Any], remote: Mapping[str, Any]) -> bool:
        """Whether this worker (``local`` descriptor) can read from the ``remote`` one."""
        ...

    async def read(
        self,
        remote: Mapping[str, Any],
        transfer_id: str,
        runs: Sequence[BlockRun],
        memory: KvMemory,
    ) -> int:
        """Pull each run's source blocks into its destination blocks of `memory`.

        Returns the bytes moved; raises `KvTransferError` (refused, unknown
        transfer) or `OSError` (unreachable) and then leaves `memory` partly
        written, which the caller treats as garbage.
        """
        ...

    async def release(self, remote: Mapping[str, Any], transfer_id: str) -> None:
        """Tell the source that `transfer_id` was pulled (or is not wanted).

        Raises `KvTransferError` when the source no longer held it (it expired,
        so its blocks may have been reused while they were read): the caller
        then discards what it read. A transport that cannot confirm says so in
        its documentation.
        """

    async def aclose(self) -> None: ...


KvTransportFactory = Callable[[TransportContext], KvTransport]
