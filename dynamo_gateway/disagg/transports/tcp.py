"""`tcp`: any two hosts. The source runs a small listener of its own; the reader
connects, asks for block runs and receives their bytes straight into its pool.

Wire format, one request per connection round trip (connections are reused):
request = 4-byte big-endian length + msgpack `_Request`; reply = 4-byte length
+ msgpack `_Reply`, then for a successful read exactly ``_Reply.nbytes`` raw
bytes: for each run in order, for each plane, the run's ``length *
page_bytes`` bytes. Both ends use blocking sockets on threads (``sendall`` of
memory views of the pool, ``recv_into`` views of the destination), so bytes are
never copied in Python. The listener serves exports only: a request for a block
outside the named transfer is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from dynamo_gateway.disagg.layout import BlockRun, KvLayout
from dynamo_gateway.disagg.transport import ExportTable, KvMemory, TransportContext
from dynamo_gateway.errors import KvTransferError

__all__ = ["TcpTransport", "TransferServer"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
_MAX_CONTROL = 1 << 20
CONNECT_TIMEOUT_S = 5.0
IO_TIMEOUT_S = 30.0


class _Request(msgspec.Struct, array_like=True):
    op: str  # "read" | "release"
    transfer_id: str
    runs: list[BlockRun] = []


class _Reply(msgspec.Struct, array_like=True):
    error: str | None = None
    nbytes: int = 0


def _send_msg(sock: socket.socket, msg: msgspec.Struct) -> None:
    body = msgspec.msgpack.encode(msg)
    sock.sendall(_HEADER.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("KV peer closed the connection mid-transfer")
        got += k


def _recv_msg(sock: socket.socket, typ: type[Any]) -> Any:
    header = bytearray(4)
    _recv_exact(sock, memoryview(header))
    (size,) = _HEADER.unpack(header)
    if size > _MAX_CONTROL:
        raise ConnectionError(f"KV control message of {size} bytes")
    body = bytearray(size)
    _recv_exact(sock, memoryview(body))
    return msgspec.msgpack.decode(bytes(body), type=typ)


def _segments(memory: KvMemory, runs: Sequence[BlockRun], side: str) -> list[memoryview]:
    arr = memory.array
    out: list[memoryview] = []
    for run in runs:
        start = run.src if side == "src" else run.dst
        for plane in range(arr.shape[0]):
            out.append(memoryview(arr[plane, start : start + run.length]).cast("B"))  # type: ignore[arg-type]
    return out


class TransferServer:
    """The source side's listener: serves reads of exported blocks and releases."""

    def __init__(
        self,
        memory: KvMemory | None,
        exports: ExportTable,
        host: str,
        advertise_host: str | None = None,
    ) -> None:
        self._memory = memory
        self._exports = exports
        self._sock = socket.create_server((host, 0))
        self.host = advertise_host or host
        self.port = int(self._sock.getsockname()[1])
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="kv-tcp-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                try:
                    req = _recv_msg(conn, _Request)
                except (ConnectionError, OSError):
                    return
                if req.op == "release":
                    held = self._exports.release(req.transfer_id)
                    error = None if held else f"transfer {req.transfer_id!r} expired here"
                    _send_msg(conn, _Reply(error=error))
                    continue
                try:
                    if req.op != "read":
                        raise KvTransferError(f"unknown KV transfer op {req.op!r}")
                    self._exports.check(req.transfer_id, req.runs)
                    memory = self._memory
                    if memory is None:
                        raise KvTransferError("this worker has no KV memory to read")
                    memory.check_runs(req.runs, side="src")
                except KvTransferError as exc:
                    _send_msg(conn, _Reply(error=str(exc)))
                    continue
                _send_msg(conn, _Reply(nbytes=memory.run_bytes(req.runs)))
                for segment in _segments(memory, req.runs, "src"):
                    conn.sendall(segment)
        except OSError as exc:
            log.debug("KV tcp connection ended: %s", exc)
        finally:
            self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    @property
    def descriptor(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port}

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()


class _Client:
    """Reused connections to peers' listeners (one in use per request)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()

    def _take(self, addr: tuple[str, int]) -> socket.socket:
        with self._lock:
            pool = self._idle.get(addr)
            if pool:
                return pool.pop()
        sock = socket.create_connection(addr, timeout=CONNECT_TIMEOUT_S)
        sock.settimeout(IO_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _give(self, addr: tuple[str, int], sock: socket.socket) -> None:
        with self._lock:
            self._idle.setdefault(addr, []).append(sock)

    def call(
        self, addr: tuple[str, int], req: _Request, dst: list[memoryview] | None = None
    ) -> int:
        sock = self._take(addr)
        try:
            _send_msg(sock, req)
            reply: _Reply = _recv_msg(sock, _Reply)
            if reply.error is not None:
                self._give(addr, sock)
                raise KvTransferError(reply.error)
            if dst is not None:
                if reply.nbytes != sum(len(v) for v in dst):
                    raise KvTransferError(
                        f"KV peer sends {reply.nbytes} bytes for "
                        f"{sum(len(v) for v in dst)} bytes of blocks"
                    )
                for view in dst:
                    _recv_exact(sock, view)
        except KvTransferError:
            raise
        except BaseException:
            sock.close()
            raise
        self._give(addr, sock)
        return reply.nbytes

    def close(self) -> None:
        with self._lock:
            for pool in self._idle.values():
                for sock in pool:
                    sock.close()
            self._idle.clear()


def address_of(remote: Mapping[str, Any]) -> tuple[str, int]:
    try:
        return str(remote["host"]), int(remote["port"])
    except (KeyError, TypeError, ValueError):
        raise KvTransferError(f"malformed tcp KV descriptor {dict(remote)!r}") from None


class TcpTransport:
    name = "tcp"

    def __init__(self, context: TransportContext) -> None:
        self._host = context.host
        self._advertise = context.advertise_host
        self._server: TransferServer | None = None
        self._client = _Client()

    def allocate(self, layout: KvLayout, num_blocks: int) -> np.ndarray[Any, Any] | None:
        return None

    async def start(self, memory: KvMemory | None, exports: ExportTable) -> dict[str, Any]:
        self._server = TransferServer(memory, exports, self._host, self._advertise)
        return self._server.descriptor

    def can_connect(self, local: Mapping[str, Any], remote: Mapping[str, Any]) -> bool:
        return "host" in remote and "port" in remote

    async def read(
        self,
        remote: Mapping[str, Any],
        transfer_id: str,
        runs: Sequence[BlockRun],
        memory: KvMemory,
    ) -> int:
        memory.check_runs(runs, side="dst")
        dst = _segments(memory, runs, "dst")
        req = _Request("read", transfer_id, list(runs))
        return await asyncio.to_thread(self._client.call, address_of(remote), req, dst)

    async def release(self, remote: Mapping[str, Any], transfer_id: str) -> None:
        await release_over_tcp(self._client, remote, transfer_id)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._client.close()


async def release_over_tcp(client: _Client, remote: Mapping[str, Any], transfer_id: str) -> None:
    await asyncio.to_thread(client.call, address_of(remote), _Request("release", transfer_id))


def new_client() -> _Client:
    return _Client()
