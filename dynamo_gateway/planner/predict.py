"""Next-interval load predictors (pure): fed one value per interval, asked for the next.

`constant` repeats the last value; `moving_average` averages a window; `holt`
is double exponential smoothing (level and trend), which follows a ramp instead
of lagging behind it - the shape of a daily swing's rising and falling hours.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol


class Predictor(Protocol):
    def observe(self, value: float) -> None:
        """Add the value measured over the interval that just ended."""

    def predict(self) -> float:
        """The value expected over the next interval (0 before any observation)."""
        ...


class Constant:
    def __init__(self) -> None:
        self._last = 0.0

    def observe(self, value: float) -> None:
        self._last = value

    def predict(self) -> float:
        return self._last


class MovingAverage:
    def __init__(self, window: int = 5) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._values: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        self._values.append(value)

    def predict(self) -> float:
        return sum(self._values) / len(self._values) if self._values else 0.0


class Holt:
    """Holt's linear method: level += alpha * error, trend smoothed by beta.

    The forecast is ``level + trend``, floored at 0 (a load is never negative).
    """

    def __init__(self, alpha: float = 0.5, beta: float = 0.3) -> None:
        if not (0 < alpha <= 1 and 0 <= beta <= 1):
            raise ValueError("need 0 < alpha <= 1 and 0 <= beta <= 1")
        self.alpha, self.beta = alpha, beta
        self._level: float | None = None
        self._trend = 0.0

    def observe(self, value: float) -> None:
        if self._level is None:
            self._level = value
            return
        previous = self._level
        self._level = self.alpha * value + (1 - self.alpha) * (previous + self._trend)
        self._trend = self.beta * (self._level - previous) + (1 - self.beta) * self._trend

    def predict(self) -> float:
        if self._level is None:
            return 0.0
        return max(0.0, self._level + self._trend)


PREDICTORS: dict[str, Callable[[], Predictor]] = {
    "constant": Constant,
    "moving_average": MovingAverage,
    "holt": Holt,
}


def make_predictor(name: str) -> Predictor:
    try:
        return PREDICTORS[name]()
    except KeyError:
        known = ", ".join(sorted(PREDICTORS))
        raise ValueError(f"unknown predictor {name!r} (known: {known})") from None
