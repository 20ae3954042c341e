"""`KvTransferAgent`: one worker's side of disaggregation, engine-neutral.

An engine with a prefill or decode role builds one agent. On the prefill
side it turns a finished prefill's pinned blocks into an `Export` (freed when
the decode side releases it or after ``disagg.kv_transfer_timeout_s``) and
the `PrefillDone` params that describe it. On the decode side `pull()` picks a
transport for the pair (the forced ``--kv-transport``, else the first of
this worker's transports whose ``can_connect`` accepts the peer, in
`PREFERENCE` order), checks the layouts, merges contiguous block runs, reads
them into the engine's pool and releases the export. An engine without real KV
memory (the mocker) pulls nothing and sleeps for ``bytes / bandwidth`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dynamo_gateway.disagg.layout import KvLayout, incompatibility, merge_runs
from dynamo_gateway.disagg.params import PrefillDone
from dynamo_gateway.disagg.transport import (
    Export,
    ExportTable,
    KvMemory,
    KvTransport,
    TransportContext,
)
from dynamo_gateway.errors import ConfigError, KvTransferError

if TYPE_CHECKING:
    import numpy as np

    from dynamo_gateway.registry import Registry
    from dynamo_gateway.settings import Settings

__all__ = ["PREFERENCE", "KvTransferAgent", "TransferStats"]

log = logging.getLogger(__name__)

# Transports tried in this order for a pair of workers; others (plugins) come after.
PREFERENCE = ("inprocess", "shm", "nixl", "tcp")
# What an engine without KV memory (the mocker) offers: enough to release exports.
SIMULATED_TRANSPORTS = ("inprocess", "tcp")
# A transfer this close to its expiry is not started: the blocks might go mid-read.
EXPIRY_MARGIN_S = 1.0
REAP_INTERVAL_S = 0.5
# Transfer-latency histogram buckets, seconds.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class TransferStats:
    """What a worker's `/metrics` shows of its KV transfers."""

    bytes_by_transport: dict[str, int] = field(default_factory=dict)
    pulls_by_transport: dict[str, int] = field(default_factory=dict)
    failed_pulls: int = 0
    refused_pulls: int = 0  # layout mismatch or a malformed/expired handoff
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum_s: float = 0.0
    exports: int = 0
    released: dict[str, int] = field(default_factory=dict)  # why -> count

    def observe(self, transport: str, nbytes: int, seconds: float) -> None:
        self.bytes_by_transport[transport] = self.bytes_by_transport.get(transport, 0) + nbytes
        self.pulls_by_transport[transport] = self.pulls_by_transport.get(transport, 0) + 1
        self.latency_sum_s += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_buckets[i] += 1
                return
        self.latency_buckets[-1] += 1


def transport_order(names: Sequence[str]) -> list[str]:
    preferred = [n for n in PREFERENCE if n in names]
    return preferred + [n for n in names if n not in preferred]


class KvTransferAgent:
    """See the module docstring. Build it on the engine's event loop."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        worker_id: str,
        layout: KvLayout,
        *,
        host: str | None = None,
        simulated_gbps: float | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.layout = layout
        self.timeout_s = settings.disagg.kv_transfer_timeout_s
        self.simulated_gbps = simulated_gbps
        self.exports = ExportTable()
        self.exports.on_release = self._released
        self.stats = TransferStats()
        self.memory: KvMemory | None = None
        self.descriptors: dict[str, dict[str, Any]] = {}
        self._transports: dict[str, KvTransport] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        ws = settings.worker
        context = TransportContext(
            settings, worker_id, layout, host or ws.host, advertise_host=ws.advertise_host
        )
        forced = settings.disagg.kv_transport
        family = registry.kv_transports
        names = [forced] if forced else transport_order(family.names())
        if simulated_gbps is not None and not forced:
            # Nothing to move: only what reaches a peer to release its blocks.
            names = [n for n in names if n in SIMULATED_TRANSPORTS]
        for name in names:
            factory = family.get(name)  # PluginNotFoundError lists the available ones
            try:
                self._transports[name] = factory(context)
            except ConfigError as exc:
                if forced:
                    raise
                log.info("worker %s: KV transport %s unavailable: %s", worker_id, name, exc)

    @property
    def transports(self) -> list[str]:
        return list(self._transports)

    def allocate(self, num_blocks: int) -> np.ndarray[Any, Any] | None:
        """Memory for the engine's KV pool from the first transport that wants it."""
        for transport in self._transports.values():
            array = transport.allocate(self.layout, num_blocks)
            if array is not None:
                return array
        return None

    async def start(self, memory: KvMemory | None) -> None:
        self.memory = memory
        for name, transport in list(self._transports.items()):
            try:
                self.descriptors[name] = await transport.start(memory, self.exports)
            except (OSError, KvTransferError, ConfigError) as exc:
                log.warning(
                    "worker %s: KV transport %s failed to start: %s", self.worker_id, name, exc
                )
                self._transports.pop(name)
        if not self._transports:
            raise ConfigError(f"worker {self.worker_id}: no KV transport could start")
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for task in list(self._tasks):
            task.cancel()
        self.exports.release_all()
        for transport in self._transports.values():
            with contextlib.suppress(Exception):
                await transport.aclose()
        self._transports.clear()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            n = self.exports.expire()
            if n:
                log.warning(
                    "worker %s: %d KV exports expired unpulled after %.0f s; blocks freed",
                    self.worker_id,
                    n,
                    self.timeout_s,
                )

    def _released(self, export: Export, why: str) -> None:
        self.stats.released[why] = self.stats.released.get(why, 0) + 1

    # -- prefill side ---------------------------------------------------------------------

    def export(
        self, block_ids: Sequence[int], num_tokens: int, release: Callable[[], None]
    ) -> dict[str, Any]:
        """Pin a finished prefill's blocks for pulling; returns its `PrefillDone` params."""
        transfer_id = f"{self.worker_id}/{uuid.uuid4().hex}"
        self.exports.add(
            Export(
                transfer_id=transfer_id,
                block_ids=tuple(block_ids),
                num_tokens=num_tokens,
                deadline=time.monotonic() + self.timeout_s,
                release=release,
            )
        )
        self.stats.exports += 1
        return PrefillDone(
            remote_engine_id=self.worker_id,
            transfer_id=transfer_id,
            remote_block_ids=list(block_ids),
            num_tokens=num_tokens,
            layout=self.layout.to_dict(),
            transports=self.descriptors,
            expires_at=time.time() + self.timeout_s,
        ).to_dict()

    @property
    def pinned_blocks(self) -> int:
        return self.exports.pinned_blocks

    # -- decode side ----------------------------------------------------------------------

    def check(self, done: PrefillDone) -> str | None:
        """Why this worker cannot take `done`'s blocks, or None (no I/O)."""
        try:
            theirs = KvLayout.from_dict(done.layout)
        except ValueError as exc:
            return str(exc)
        why = incompatibility(self.layout, theirs)
        if why is not None:
            return why
        if done.expires_at - time.time() < EXPIRY_MARGIN_S:
            return f"transfer {done.transfer_id} expires too soon to start"
        if self.pick(done) is None:
            return (
                f"no KV transport connects {self.worker_id} to {done.remote_engine_id} "
                f"(theirs: {sorted(done.transports)}, ours: {sorted(self._transports)})"
            )
        return None

    def pick(self, done: PrefillDone) -> str | None:
        for name, transport in self._transports.items():
            remote = done.transports.get(name)
            if remote is not None and transport.can_connect(self.descriptors[name], remote):
                return name
        return None

    async def pull(self, done: PrefillDone, src_ids: Sequence[int], dst_ids: Sequence[int]) -> int:
        """Read `src_ids` of the source into this pool's `dst_ids`; release; bytes moved.

        Raises `KvTransferError` (refused, expired) or `OSError` (unreachable);
        what was written to `dst_ids` is garbage then.
        """
        why = self.check(done)
        if why is not None:
            self.stats.refused_pulls += 1
            self.release_later(done)
            raise KvTransferError(why)
        name = self.pick(done)
        assert name is not None
        transport = self._transports[name]
        remote = done.transports[name]
        runs = merge_runs(src_ids, dst_ids)
        start = time.perf_counter()
        try:
            if self.memory is None:
                nbytes = len(src_ids) * self.layout.block_bytes
                if self.simulated_gbps:
                    await asyncio.sleep(nbytes / (self.simulated_gbps * 1e9))
            else:
                nbytes = await transport.read(remote, done.transfer_id, runs, self.memory)
            await transport.release(remote, done.transfer_id)
        except (KvTransferError, OSError, TimeoutError) as exc:
            self.stats.failed_pulls += 1
            raise KvTransferError(
                f"pulling {len(src_ids)} KV blocks from {done.remote_engine_id} over {name} "
                f"failed: {exc}"
            ) from exc
        self.stats.observe(name, nbytes, time.perf_counter() - start)
        return nbytes

    def release_later(self, done: PrefillDone) -> None:
        """Tell the source to unpin `done` (a refused or unneeded transfer); best effort."""
        name = self.pick(done)
        if name is None:
            return  # nothing reaches it: it expires there
        transport = self._transports[name]

        async def run() -> None:
            with contextlib.suppress(KvTransferError, OSError, TimeoutError):
                await transport.release(done.transports[name], done.transfer_id)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
