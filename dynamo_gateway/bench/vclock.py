"""An asyncio event loop on a virtual clock: simulated time jumps, it is never waited for.

`VirtualClockLoop` is asyncio's selector loop with two changes. ``time()`` reads
a virtual clock that starts at 0. And when the loop would block - nothing is
ready, the next timer is ``t`` seconds away - it looks for ready I/O without
waiting and, finding none, moves the clock ``t`` ahead at once. Everything that
waits on the loop's clock (``asyncio.sleep``, timeouts, ``call_later``: the
mocker's step times, the planner's intervals, a worker's start-up delay) keeps
its meaning, and an hour of simulated traffic costs only the CPU its work takes.

NOTE on what takes no simulated time: computation on the loop, and work handed
to the loop's executor (``asyncio.to_thread``: tokenising a long prompt), which
runs inline, at once: threads would finish in whatever order the machine lets
them, and a replay must make the same decisions every time. That is the model of
a replay: the engines' costs are simulated, the gateway's own CPU time is not
charged. (So executor work must not wait for the loop; nothing in a replay does.)
Real sockets still work (they are polled), but a peer in another process runs on
real time, so a virtual-clock run must keep its parts in-process.

`run(coro)` runs a coroutine on such a loop, with `dynamo_gateway.clock.now`
reading the virtual clock meanwhile.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

from dynamo_gateway import clock

__all__ = ["VirtualClockLoop", "run"]

T = TypeVar("T")

# With nothing scheduled, how long the loop waits in real time for another thread
# or process to wake it, between checks.
_THREAD_WAIT_S = 0.05


class _VirtualSelector(selectors.DefaultSelector):
    """Polls instead of blocking, and charges the wait to the loop's virtual clock."""

    loop: VirtualClockLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        loop = self.loop
        assert loop is not None
        ready = list(super().select(0))
        if ready or timeout is None or timeout <= 0:
            if not ready and timeout is None:
                # Nothing scheduled and nothing to wait for on this loop: only another
                # thread or process can wake it. Wait for that in real time.
                return list(super().select(_THREAD_WAIT_S))
            return ready
        loop.advance(timeout)
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is simulated (see the module docstring)."""

    def __init__(self) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = 0.0

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (the selector does, when the loop would wait)."""
        if seconds > 0:
            self._now += seconds

    def run_in_executor(  # type: ignore[override]
        self, executor: Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        future: asyncio.Future[T] = self.create_future()
        try:
            future.set_result(func(*args))
        except BaseException as exc:  # delivered to the awaiting coroutine
            future.set_exception(exc)
        return future


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh `VirtualClockLoop`."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        loop = runner.get_loop()
        with clock.use(loop.time):
            return runner.run(main)
