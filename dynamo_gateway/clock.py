"""The clock latencies and TTLs are measured on: the machine's, or a simulated one.

Code that times requests (TTFT and ITL metrics, router TTLs, session affinity)
reads `now()` instead of `time.perf_counter()` so that a replay on a virtual
clock (`dynamo_gateway.bench.vclock`) measures simulated time, the same way the
simulated engines and the planner experience it. In production `now()` is
`time.perf_counter()` (monotonic, sub-microsecond); `use()` swaps the source for
the duration of a `with` block.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

__all__ = ["now", "use"]

_source: Callable[[], float] = time.perf_counter


def now() -> float:
    """Seconds on the current clock (monotonic; only differences mean anything)."""
    return _source()


@contextlib.contextmanager
def use(source: Callable[[], float]) -> Iterator[None]:
    """Make `now()` read `source` inside the block (not thread-safe: one at a time)."""
    global _source
    previous, _source = _source, source
    try:
        yield
    finally:
        _source = previous
