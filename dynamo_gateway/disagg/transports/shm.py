"""`shm`: two processes on one host. The source's KV pool itself lives in a
shared-memory file (``/dev/shm/dgw-kv-<worker>-<random>``), so a reader maps it
and copies block runs straight into its own pool: a one-sided read, one copy,
no socket in the data path. Releases go over a small TCP control listener
(the `tcp` transport's, which also serves reads as a fallback).

Same host = same ``/proc/sys/kernel/random/boot_id`` and hostname, and the
file exists. The file is unlinked when the transport closes; one left by a
killed worker (its name starts with the creator's pid) is removed by the next
worker that allocates a pool on the host.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynamo_gateway.disagg.layout import BlockRun, KvLayout
from dynamo_gateway.disagg.transport import ExportTable, KvMemory, TransportContext
from dynamo_gateway.disagg.transports.inprocess import copy_checked
from dynamo_gateway.disagg.transports.tcp import TransferServer, new_client, release_over_tcp
from dynamo_gateway.errors import KvTransferError

__all__ = ["ShmTransport", "host_id"]

SHM_DIR = Path("/dev/shm")


def host_id() -> str:
    """Names this host (and boot): processes with equal ids can share memory files."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


PREFIX = "dgw-kv-"


def remove_stale_pools(directory: Path = SHM_DIR) -> list[Path]:
    """Unlink pool files left by processes that died without closing (kill -9).

    A file's name starts with its creator's pid; a pid that no longer runs (or
    that is not ours to signal: another user's) leaves the file alone only in the
    latter case. Returns the files removed.
    """
    removed: list[Path] = []
    for path in directory.glob(f"{PREFIX}*"):
        pid_text = path.name[len(PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
        except PermissionError:
            pass  # alive, someone else's
    return removed


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:64]


class _Mapping:
    """A mapped shared-memory pool of a peer (or of this worker)."""

    def __init__(self, path: Path, layout: KvLayout, num_blocks: int, *, create: bool) -> None:
        size = layout.planes * num_blocks * layout.page_bytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)  # tmpfs: reads as zeros, pages come on first touch
            elif os.fstat(fd).st_size < size:
                raise KvTransferError(f"shared KV file {path} is smaller than its descriptor")
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.array: np.ndarray[Any, np.dtype[np.uint8]] = np.frombuffer(
            self.mm, dtype=np.uint8
        ).reshape(layout.planes, num_blocks, layout.page_bytes)

    def close(self) -> None:
        self.array = np.empty((0, 0, 0), np.uint8)
        with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
            self.mm.close()


def _same_memory(memory: KvMemory, own: _Mapping) -> bool:
    """Whether the engine built its pool on our shared file (not on memory of its own)."""
    ptr = int(memory.array.__array_interface__["data"][0])
    return (
        ptr == int(own.array.__array_interface__["data"][0])
        and memory.array.nbytes == own.array.nbytes
    )


class ShmTransport:
    name = "shm"

    def __init__(self, context: TransportContext) -> None:
        self._context = context
        self._own: _Mapping | None = None
        self._path: Path | None = None
        self._server: TransferServer | None = None
        self._client = new_client()
        self._peers: dict[str, tuple[_Mapping, KvLayout]] = {}
        self._host_id = host_id()

    def allocate(self, layout: KvLayout, num_blocks: int) -> np.ndarray[Any, Any] | None:
        if not SHM_DIR.is_dir():
            return None  # no shared memory here: plain memory, peers fall back to tcp
        remove_stale_pools()
        name = f"{PREFIX}{os.getpid()}-{_safe(self._context.worker_id)}-{uuid.uuid4().hex[:8]}"
        self._path = SHM_DIR / name
        self._own = _Mapping(self._path, layout, num_blocks, create=True)
        return self._own.array

    async def start(self, memory: KvMemory | None, exports: ExportTable) -> dict[str, Any]:
        self._server = TransferServer(
            memory, exports, self._context.host, self._context.advertise_host
        )
        desc: dict[str, Any] = {"host_id": self._host_id, "control": self._server.descriptor}
        if memory is not None and self._own is not None and _same_memory(memory, self._own):
            desc["path"] = str(self._path)
            desc["num_blocks"] = memory.num_blocks
        return desc

    def can_connect(self, local: Mapping[str, Any], remote: Mapping[str, Any]) -> bool:
        return remote.get("host_id") == self._host_id and "path" in remote

    def _peer(self, remote: Mapping[str, Any], layout: KvLayout) -> _Mapping:
        path = str(remote.get("path", ""))
        known = self._peers.get(path)
        if known is not None and known[1] == layout:
            return known[0]
        try:
            mapping = _Mapping(Path(path), layout, int(remote["num_blocks"]), create=False)
        except (OSError, KeyError, ValueError) as exc:
            raise KvTransferError(f"cannot map the peer's shared KV pool {path!r}: {exc}") from exc
        self._peers[path] = (mapping, layout)
        return mapping

    async def read(
        self,
        remote: Mapping[str, Any],
        transfer_id: str,
        runs: Sequence[BlockRun],
        memory: KvMemory,
    ) -> int:
        src = KvMemory(memory.layout, self._peer(remote, memory.layout).array)
        # One-sided: the source cannot check the runs, so a stale or foreign transfer
        # id is caught by the release (which the caller sends after every read).
        return await copy_checked(src, memory, runs)

    async def release(self, remote: Mapping[str, Any], transfer_id: str) -> None:
        control = remote.get("control")
        if not isinstance(control, Mapping):
            raise KvTransferError(f"shm KV descriptor without a control address: {remote!r}")
        await release_over_tcp(self._client, control, transfer_id)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._client.close()
        for mapping, _ in self._peers.values():
            mapping.close()
        self._peers.clear()
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
            self._path = None
        # The engine's cache may still view our mapping; it is unmapped with it.
