"""`nixl`: decode workers pull KV blocks with one-sided NIXL READs (UCX backend).

Each worker runs one NIXL agent (named ``<worker_id>-<random>``) and registers
its whole KV pool, ``KvMemory.array``, with it once. The descriptor it
advertises carries the agent's metadata (connection info and the memory keys
of that registration, base64) and where the pool lies (base address, blocks,
page size, planes), so a reader can address any block run of it.

A read builds, for every run and every plane, one segment of ``length *
page_bytes`` bytes on each side and posts them as one READ transfer; the
source's CPU takes no part. A release is a NIXL notification
``release:<transfer_id>`` that the source's agent picks up in a poll task and
hands to its `ExportTable`.

Limits of a one-sided pull, which the caller must know:

* the source cannot check a read: any registered block can be read, whether or
  not the named transfer owns it (this side checks that the runs fit both
  pools);
* `release()` cannot confirm: the notification is fire-and-forget, so it never
  raises for a transfer that expired at its source. A read that raced the
  source's expiry may have read reused blocks without anyone noticing.

NIXL is imported only when a transport is built (see `factory.import_nixl`).
Every NIXL call is made on the event loop's thread (the agent runs without
NIXL's internal locking), except building the agent, which runs in a thread
before the agent is shared.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from dynamo_gateway.disagg.layout import BlockRun, KvLayout
from dynamo_gateway.disagg.transport import ExportTable, KvMemory, TransportContext
from dynamo_gateway.errors import ConfigError, KvTransferError

__all__ = ["NOTIF_POLL_S", "RELEASE_PREFIX", "NixlTransport"]

log = logging.getLogger(__name__)

BACKEND = "UCX"
MEM_TYPE = "DRAM"
RELEASE_PREFIX = b"release:"
NOTIF_POLL_S = 0.005  # how often the source looks for release notifications ...
IDLE_POLL_S = 0.1  # ... and how often while it holds no exports (they cost CPU)
_SPIN_POLLS = 64  # transfer-state polls that only yield before sleeping between polls
_POLL_SLEEP_S = 0.0002
_MEMORY_FIELDS = ("addr", "num_blocks", "page_bytes", "planes")


def _nixl_error(what: str, exc: Exception) -> Exception:
    """A NIXL binding exception as the contract's error: `OSError` when the peer is gone."""
    kind = type(exc).__name__
    if kind == "nixlRemoteDisconnectError":
        return ConnectionError(f"{what}: the NIXL peer disconnected ({exc})")
    return KvTransferError(f"{what}: {kind} {exc}")


def _base_address(array: np.ndarray[Any, Any]) -> int:
    return int(array.__array_interface__["data"][0])


def _segments(
    base: int,
    num_blocks: int,
    page_bytes: int,
    planes: int,
    starts: np.ndarray[Any, Any],
    lengths: np.ndarray[Any, Any],
) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """Rows ``(address, bytes, device 0)``: run-major, then plane, as both sides agree."""
    plane_offsets = np.arange(planes, dtype=np.uint64) * np.uint64(num_blocks)
    blocks = (starts[:, None] + plane_offsets[None, :]).reshape(-1)
    out = np.zeros((blocks.size, 3), dtype=np.uint64)
    out[:, 0] = np.uint64(base) + blocks * np.uint64(page_bytes)
    out[:, 1] = np.repeat(lengths * np.uint64(page_bytes), planes)
    return out


class _Region:
    """One local array registered with the agent (kept alive while registered)."""

    def __init__(self, array: np.ndarray[Any, Any], reg: Any) -> None:
        self.array = array
        self.reg = reg


class NixlTransport:
    name = "nixl"

    def __init__(self, context: TransportContext, nixl: ModuleType) -> None:
        self._context = context
        self._nixl = nixl
        self._agent_name = f"{context.worker_id}-{uuid.uuid4().hex[:8]}"
        self._agent: Any = None
        self._exports: ExportTable | None = None
        self._regions: dict[tuple[int, int], _Region] = {}
        self._remotes: dict[str, str] = {}  # descriptor's agent name -> loaded agent name
        self._poll_task: asyncio.Task[None] | None = None
        self._timeout_s = float(context.settings.disagg.kv_transfer_timeout_s)

    @property
    def agent_name(self) -> str:
        return self._agent_name

    def allocate(self, layout: KvLayout, num_blocks: int) -> np.ndarray[Any, Any] | None:
        return None  # NIXL registers plain host memory as it is

    # -- source side ---------------------------------------------------------------

    def _new_agent(self) -> Any:
        api = self._nixl
        config = api.nixl_agent_config(backends=[BACKEND])
        agent = api.nixl_agent(self._agent_name, config)
        if BACKEND not in agent.backends:
            raise ConfigError(
                f"NIXL could not start its {BACKEND} backend (plugins found: "
                f"{agent.get_plugin_list()}); check NIXL_PLUGIN_DIR and the UCX install"
            )
        return agent

    def _register(self, array: np.ndarray[Any, Any]) -> None:
        if not array.flags.c_contiguous:
            raise KvTransferError("NIXL needs the KV pool in one C-contiguous array")
        key = (_base_address(array), int(array.nbytes))
        if key in self._regions:
            return
        try:
            reg = self._agent.register_memory([(key[0], key[1], 0, "")], MEM_TYPE)
        except Exception as exc:
            raise _nixl_error("cannot register the KV pool with NIXL", exc) from exc
        self._regions[key] = _Region(array, reg)

    async def start(self, memory: KvMemory | None, exports: ExportTable) -> dict[str, Any]:
        if self._agent is not None:
            raise RuntimeError("the nixl transport is already started")
        self._agent = await asyncio.to_thread(self._new_agent)
        self._exports = exports
        desc: dict[str, Any] = {"agent": self._agent_name}
        if memory is not None:
            self._register(memory.array)
            desc.update(
                addr=_base_address(memory.array),
                num_blocks=memory.num_blocks,
                page_bytes=memory.layout.page_bytes,
                planes=memory.layout.planes,
            )
        # After registering: the metadata carries the registration's remote keys.
        desc["metadata"] = base64.b64encode(self._agent.get_agent_metadata()).decode("ascii")
        self._poll_task = asyncio.create_task(self._poll_notifs(), name="nixl-notifs")
        return desc

    def _drain_notifs(self) -> None:
        exports = self._exports
        notifs: dict[str, list[bytes]] = self._agent.get_new_notifs()
        for sender, messages in notifs.items():
            for msg in messages:
                if exports is not None and msg.startswith(RELEASE_PREFIX):
                    tid = msg[len(RELEASE_PREFIX) :].decode("utf-8", "replace")
                    if not exports.release(tid):
                        log.debug("nixl release of %r from %s: not held here", tid, sender)
                else:
                    log.debug("nixl notification from %s ignored: %r", sender, msg[:64])

    async def _poll_notifs(self) -> None:
        while True:
            try:
                self._drain_notifs()
            except Exception:
                log.exception("polling NIXL notifications failed")
            busy = self._exports is not None and len(self._exports) > 0
            await asyncio.sleep(NOTIF_POLL_S if busy else IDLE_POLL_S)

    # -- decode side ---------------------------------------------------------------

    def can_connect(self, local: Mapping[str, Any], remote: Mapping[str, Any]) -> bool:
        """The remote's agent is reachable by metadata, and its pool readable if we read.

        A worker without KV memory (the mocker) never reads, only releases, so it
        pairs with any agent; one with memory needs the remote's pool fields.
        """
        if not isinstance(remote.get("agent"), str) or not isinstance(remote.get("metadata"), str):
            return False
        if not any(f in local for f in _MEMORY_FIELDS):
            return True
        return all(isinstance(remote.get(f), int) for f in _MEMORY_FIELDS)

    def _remote_agent(self, remote: Mapping[str, Any]) -> str:
        if self._agent is None:
            raise KvTransferError("the nixl transport is not started")
        name = remote.get("agent")
        metadata = remote.get("metadata")
        if not isinstance(name, str) or not isinstance(metadata, str):
            raise KvTransferError(f"nixl KV descriptor without agent metadata: {remote!r}")
        loaded = self._remotes.get(name)
        if loaded is not None:
            return loaded
        try:
            raw = base64.b64decode(metadata, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise KvTransferError(f"malformed NIXL metadata of agent {name!r}") from exc
        try:
            got = self._agent.add_remote_agent(raw)
        except Exception as exc:
            what = f"cannot load NIXL agent {name!r}"
            if type(exc).__name__ == "nixlBackendError":  # metadata fine, endpoint not
                raise ConnectionError(f"{what}: UCX cannot reach it ({exc})") from exc
            raise _nixl_error(what, exc) from exc
        loaded = got.decode() if isinstance(got, bytes) else str(got)
        self._remotes[name] = loaded
        return loaded

    def _forget(self, name: str) -> None:
        loaded = self._remotes.pop(name, None)
        if loaded is not None and self._agent is not None:
            with contextlib.suppress(Exception):
                self._agent.remove_remote_agent(loaded)

    @staticmethod
    def _remote_pool(remote: Mapping[str, Any], memory: KvMemory) -> tuple[int, int]:
        fields = [remote.get(f) for f in _MEMORY_FIELDS]
        if not all(isinstance(v, int) for v in fields):
            raise KvTransferError(f"nixl peer {remote.get('agent')!r} has no KV memory")
        addr, num_blocks, page_bytes, planes = (int(v) for v in fields)  # type: ignore[arg-type]
        layout = memory.layout
        if page_bytes != layout.page_bytes or planes != layout.planes:
            raise KvTransferError(
                f"nixl peer pool has {planes} planes of {page_bytes}-byte pages, "
                f"this one {layout.planes} of {layout.page_bytes}"
            )
        return addr, num_blocks

    async def read(
        self,
        remote: Mapping[str, Any],
        transfer_id: str,
        runs: Sequence[BlockRun],
        memory: KvMemory,
    ) -> int:
        memory.check_runs(runs, side="dst")
        remote_addr, remote_blocks = self._remote_pool(remote, memory)
        for run in runs:
            if run.src < 0 or run.src + run.length > remote_blocks:
                raise KvTransferError(
                    f"block run {run} is outside the peer's pool of {remote_blocks} blocks"
                )
        if not runs:
            return 0
        agent_key = str(remote["agent"])
        peer = self._remote_agent(remote)
        self._register(memory.array)  # a no-op for the pool registered at start

        layout = memory.layout
        lengths = np.array([r.length for r in runs], dtype=np.uint64)
        local = _segments(
            _base_address(memory.array),
            memory.num_blocks,
            layout.page_bytes,
            layout.planes,
            np.array([r.dst for r in runs], dtype=np.uint64),
            lengths,
        )
        source = _segments(
            remote_addr,
            remote_blocks,
            layout.page_bytes,
            layout.planes,
            np.array([r.src for r in runs], dtype=np.uint64),
            lengths,
        )
        agent = self._agent
        what = f"NIXL read of transfer {transfer_id!r} from {agent_key!r}"
        try:
            handle = agent.initialize_xfer(
                "READ",
                agent.get_xfer_descs(local, MEM_TYPE),
                agent.get_xfer_descs(source, MEM_TYPE),
                peer,
            )
        except Exception as exc:
            self._forget_if_gone(agent_key, exc)
            raise _nixl_error(what, exc) from exc
        try:
            await self._wait(handle, what, agent_key)
        finally:
            try:
                agent.release_xfer_handle(handle)
            except Exception as exc:  # still in flight and not cancellable
                log.warning("%s: cannot release its NIXL handle: %s", what, exc)
        return memory.run_bytes(runs)

    def _forget_if_gone(self, agent_key: str, exc: Exception) -> None:
        if type(exc).__name__ in ("nixlRemoteDisconnectError", "nixlNotFoundError"):
            self._forget(agent_key)

    async def _wait(self, handle: Any, what: str, agent_key: str) -> None:
        agent = self._agent
        try:
            state = agent.transfer(handle)
            deadline = time.monotonic() + self._timeout_s
            polls = 0
            while state == "PROC":
                if polls < _SPIN_POLLS:
                    await asyncio.sleep(0)
                else:
                    if time.monotonic() > deadline:
                        raise KvTransferError(f"{what}: timed out after {self._timeout_s:g} s")
                    await asyncio.sleep(_POLL_SLEEP_S)
                polls += 1
                state = agent.check_xfer_state(handle)
        except KvTransferError:
            raise
        except Exception as exc:
            self._forget_if_gone(agent_key, exc)
            raise _nixl_error(what, exc) from exc
        if state != "DONE":
            self._forget(agent_key)  # a failed transfer may leave a broken endpoint
            raise KvTransferError(f"{what} failed (state {state})")

    async def release(self, remote: Mapping[str, Any], transfer_id: str) -> None:
        """Send ``release:<transfer_id>`` to the source; cannot confirm (see module doc)."""
        agent_key = str(remote.get("agent"))
        peer = self._remote_agent(remote)
        try:
            self._agent.send_notif(peer, RELEASE_PREFIX + transfer_id.encode())
        except Exception as exc:
            self._forget_if_gone(agent_key, exc)
            raise _nixl_error(
                f"cannot release transfer {transfer_id!r} at {agent_key!r}", exc
            ) from exc

    async def aclose(self) -> None:
        task, self._poll_task = self._poll_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # never raises: no traceback keeps the agent alive
            del task
        if self._agent is None:
            return
        if self._exports is not None:
            with contextlib.suppress(Exception):
                self._drain_notifs()  # releases that arrived since the last poll
        for name in list(self._remotes):
            self._forget(name)
        for region in self._regions.values():
            try:
                self._agent.deregister_memory(region.reg)
            except Exception as exc:
                log.warning("deregistering the KV pool from NIXL failed: %s", exc)
        self._regions.clear()
        self._exports = None
        # NIXL has no explicit shutdown: the agent stops its UCX worker when collected,
        # so no reference to it may outlive this.
        self._agent = None
