"""What engines wrapping another library's engine (vLLM, SGLang, ...) have in common.

`LibraryEngine` keeps the lifecycle: `start()` runs the subclass's `_start()`
once, from CREATED through STARTING to RUNNING, or to FAILED after calling
`_release()` (which must then undo whatever `_start()` got done); `aclose()`
calls `_release()` once and leaves the engine STOPPED. `kv_event_endpoint()`
gives the ``ipc://`` address, private to this engine, where a library's ZMQ
KV-event publisher binds; `_release()` removes it.
"""

from __future__ import annotations

import os
import tempfile
from typing import ClassVar

from dynamo_gateway.engines.base import EngineBase, EngineContext, EngineState
from dynamo_gateway.errors import EngineError

__all__ = ["LibraryEngine"]


class LibraryEngine(EngineBase):
    """Lifecycle plumbing for an engine that wraps a library (see the module docstring)."""

    kind: ClassVar[str] = "engine"  # names the engine in messages: "vllm engine w0 is stopped"

    def __init__(self, context: EngineContext) -> None:
        self._context = context
        self._state = EngineState.CREATED
        self._block_size = context.settings.cache.block_size
        self._ipc_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def block_size(self) -> int:
        return self._block_size

    async def start(self) -> None:
        if self._state is not EngineState.CREATED:
            return
        self._state = EngineState.STARTING
        try:
            await self._start()
        except BaseException:
            self._state = EngineState.FAILED
            await self._release()
            raise
        self._state = EngineState.RUNNING

    async def aclose(self) -> None:
        if self._state is EngineState.STOPPED:
            return
        await self._release()
        self._state = EngineState.STOPPED

    async def _start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def _release(self) -> None:
        """Free what `_start()` acquired; subclasses extend it and call this last."""
        if self._ipc_dir is not None:
            self._ipc_dir.cleanup()
            self._ipc_dir = None

    def _check_running(self) -> None:
        if self._state is not EngineState.RUNNING:
            raise EngineError(
                f"{self.kind} engine {self._context.worker_id} is {self._state.value}"
            )

    def kv_event_endpoint(self) -> str:
        """An ``ipc://`` address in a directory of this engine's own (removed on release)."""
        if self._ipc_dir is None:
            self._ipc_dir = tempfile.TemporaryDirectory(prefix=f"dgw-{self.kind}-")
        return f"ipc://{os.path.join(self._ipc_dir.name, 'kv-events')}"
