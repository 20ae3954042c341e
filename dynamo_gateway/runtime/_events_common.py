"""Pieces the event-plane backends share: subscriber queues and a rate-limited logger.

Every subscription owns a bounded `asyncio.Queue`; a backend feeds it with
`put_dropping_oldest` (a slow subscriber loses the oldest messages, never blocks
the publisher), ends it with `close_queues` (which queues `CLOSE`), and the
remote backends turn it into decoded messages with `decode_queue`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import TypeVar

import msgspec

T = TypeVar("T", bound=msgspec.Struct)

CLOSE = object()
"""Queued for a subscriber when its plane closes: the subscription ends there."""


class RateLimitedLog:
    """Logs a recurring warning at most once per `interval_s`, with a count of the rest."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last = -float("inf")
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" (and {self._suppressed} more since the last report)"
        self._last = now
        self._suppressed = 0
        self.logger.warning(msg, *args, stacklevel=2)


def put_dropping_oldest(queue: asyncio.Queue[object], item: object) -> bool:
    """Queue `item`, first dropping the oldest entry if `queue` is full; True if it dropped one."""
    dropped = queue.full()
    if dropped:
        queue.get_nowait()
    queue.put_nowait(item)
    return dropped


def close_queues(queues: Iterable[asyncio.Queue[object]]) -> None:
    """End the subscriptions reading `queues`: queue `CLOSE` (dropping the oldest if full)."""
    for queue in queues:
        put_dropping_oldest(queue, CLOSE)


async def decode_queue(
    queue: asyncio.Queue[object],
    type: type[T],
    *,
    closed: Callable[[], bool],
    decode_log: RateLimitedLog,
    plane: str,
    topic: str,
) -> AsyncGenerator[T, None]:
    """The msgpack payloads in `queue` decoded as `type`, until `CLOSE` or `closed()`.

    Payloads that do not decode are logged (as ``<plane>: skipped a message ...``) and skipped.
    """
    decoder = msgspec.msgpack.Decoder(type)
    while not closed():
        data = await queue.get()
        if data is CLOSE:
            break
        assert isinstance(data, bytes)
        try:
            message = decoder.decode(data)
        except msgspec.DecodeError as exc:
            decode_log.warning(
                f"{plane}: skipped a message on %r that is not a %s: %s",
                topic,
                type.__name__,
                exc,
            )
            continue
        yield message
