"""An engine's performance profile and what the `sla` policy reads from it (pure).

`dynamo-gateway profile` measures, on this machine: the time to prefill a prompt
of each input length (one request alone), and the inter-token latency of a
decode batch of each size at each context length. Saved as JSON; the `sla`
policy interpolates it to size pools so TTFT and ITL targets hold.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dynamo_gateway.errors import ConfigError


@dataclass(frozen=True)
class DecodePoint:
    batch: int
    context: int
    itl_s: float


@dataclass(frozen=True)
class Profile:
    engine: str
    model: str
    prefill: list[tuple[int, float]]  # (input tokens, seconds), ascending
    decode: list[DecodePoint]
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ConfigError("a profile needs prefill and decode points")
        object.__setattr__(self, "prefill", sorted((int(n), float(s)) for n, s in self.prefill))

    # -- prefill --------------------------------------------------------------------------

    def prefill_s(self, tokens: float) -> float:
        """Seconds to prefill `tokens` alone: linear between points, extrapolated past them."""
        xs = [n for n, _ in self.prefill]
        ys = [s for _, s in self.prefill]
        if len(xs) == 1:
            return ys[0] * max(tokens, 1) / max(xs[0], 1)
        i = min(max(bisect.bisect_left(xs, tokens), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
        return max(1e-6, y0 + slope * (tokens - x0))

    # -- decode ---------------------------------------------------------------------------

    def _contexts(self) -> list[int]:
        return sorted({p.context for p in self.decode})

    def _itl_at_context(self, context: int, batch: float) -> float:
        pts = sorted((p.batch, p.itl_s) for p in self.decode if p.context == context)
        xs = [b for b, _ in pts]
        ys = [s for _, s in pts]
        if len(xs) == 1:
            return ys[0]
        i = min(max(bisect.bisect_left(xs, batch), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(1e-6, y0 + (y1 - y0) / (x1 - x0) * (batch - x0))

    def itl_s(self, batch: float, context: float) -> float:
        """Inter-token latency of a batch at a context length (bilinear, clamped in context)."""
        cs = self._contexts()
        if context <= cs[0]:
            return self._itl_at_context(cs[0], batch)
        if context >= cs[-1]:
            return self._itl_at_context(cs[-1], batch)
        i = bisect.bisect_left(cs, context)
        c0, c1 = cs[i - 1], cs[i]
        w = (context - c0) / (c1 - c0)
        return (1 - w) * self._itl_at_context(c0, batch) + w * self._itl_at_context(c1, batch)

    def max_batch(self, itl_target_s: float, context: float) -> int:
        """The largest decode batch whose ITL stays within the target (at least 1)."""
        top = max(p.batch for p in self.decode)
        best = 1
        for b in range(1, 4 * top + 1):  # a little extrapolation past the measured range
            if self.itl_s(b, context) <= itl_target_s:
                best = b
            else:
                break
        return best

    # -- files ----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Profile:
        try:
            raw = json.loads(path.read_text())
            return cls(
                engine=str(raw["engine"]),
                model=str(raw["model"]),
                prefill=[(int(n), float(s)) for n, s in raw["prefill"]],
                decode=[DecodePoint(**p) for p in raw["decode"]],
                meta={str(k): str(v) for k, v in raw.get("meta", {}).items()},
            )
        except FileNotFoundError:
            raise ConfigError(
                f"profile {path} does not exist (run `dynamo-gateway profile`)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"profile {path} is not a valid profile: {exc}") from exc


def ceil_div(a: float, b: float) -> int:
    return max(0, math.ceil(a / b - 1e-9)) if b > 0 else 0
