"""One TCP connection carrying request-plane frames, for both ends.

Received bytes are cut into frames (`wire.FrameCodec`) and handed to
`frames_received()`; frames sent during one event-loop iteration are written
with a single `transport.write()`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from dynamo_gateway.runtime.wire import Frame, FrameCodec, FrameError

log = logging.getLogger(__name__)


class FrameConnection(asyncio.Protocol):
    """Base of both ends' connection protocols; subclasses implement `frames_received`."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._codec = FrameCodec()
        self._transport: asyncio.Transport | None = None
        self._wbuf = bytearray()
        self._flush_pending = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._codec.feed(data)
        except FrameError as exc:
            log.warning("request plane: closing a connection that sent bad data: %s", exc)
            self.abort()
            return
        self.frames_received(frames)

    def frames_received(self, frames: list[Frame]) -> None:
        raise NotImplementedError

    def send(self, frame: Frame) -> None:
        """Queue `frame`; it goes out at the end of this loop iteration."""
        if self._transport is None:
            return
        self._codec.encode(frame, self._wbuf)
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        if self._transport is not None and self._wbuf:
            self._transport.write(bytes(self._wbuf))
        self._wbuf.clear()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
