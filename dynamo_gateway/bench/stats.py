"""Pure statistics helpers for the load generator.

Kept free of numpy so the client stays light; the percentile definition matches numpy's
default (``method="linear"``), which the tests check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["DEFAULT_PERCENTILES", "mean", "percentile", "percentiles", "summarize"]

#: The percentiles every latency summary reports.
DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)


def _percentile_sorted(data: Sequence[float], q: float) -> float:
    """``q``-th percentile (0..100) of already sorted, non-empty ``data``."""
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise ValueError(f"percentile must be within [0, 100], got {q!r}")
    n = len(data)
    if n == 1:
        return float(data[0])
    rank = (n - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    lo_v = float(data[lo])
    # Written as lo + frac*(hi-lo) like numpy, so equal neighbours give exactly that value.
    return lo_v + frac * (float(data[hi]) - lo_v)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation; ``None`` when empty."""
    data = sorted(values)
    if not data:
        return None
    return _percentile_sorted(data, q)


def percentiles(values: Iterable[float], qs: Sequence[float]) -> list[float | None]:
    """Several percentiles at once (sorts only once)."""
    data = sorted(values)
    if not data:
        return [None for _ in qs]
    return [_percentile_sorted(data, q) for q in qs]


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean; ``None`` when empty."""
    total = 0.0
    n = 0
    for v in values:
        total += v
        n += 1
    return total / n if n else None


def summarize(
    values: Iterable[float],
    scale: float = 1.0,
    qs: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, float | None]:
    """``{"mean", "p50", "p90", "p99"}`` of ``values`` multiplied by ``scale``.

    ``scale`` converts units (e.g. ``1000.0`` for seconds -> milliseconds). Every entry is
    ``None`` for empty input so JSON consumers see ``null`` rather than a fake zero.
    """
    data = sorted(values)
    out: dict[str, float | None] = {}
    if not data:
        out["mean"] = None
        for q in qs:
            out[_key(q)] = None
        return out
    out["mean"] = math.fsum(data) / len(data) * scale
    for q in qs:
        out[_key(q)] = _percentile_sorted(data, q) * scale
    return out


def _key(q: float) -> str:
    """``50.0 -> "p50"``, ``99.9 -> "p99.9"``."""
    return f"p{int(q)}" if float(q).is_integer() else f"p{q:g}"
