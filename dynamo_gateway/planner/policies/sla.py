"""The `sla` policy: predict next interval's traffic, size pools from a profile.

Per model, a predictor (`constant`, `moving_average`, `holt`) forecasts the
request rate and mean input and output lengths from the frontends' counters.
With the model's profile (`dynamo-gateway profile`):

* prefill: one request's prefill takes ``p = prefill_s(isl)``; the pool does
  ``rate * p`` worker-seconds of prefill per second. Queueing stretches TTFT
  roughly as ``p / (1 - u)`` at utilisation ``u``, so the pool is planned at
  ``u <= min(max_utilisation, 1 - p / ttft_target)``;
* decode: the largest batch whose ITL meets the target at context
  ``isl + osl / 2`` is ``b``; by Little's law ``rate * osl * itl(b)`` requests
  decode at once, so ``ceil(that / b)`` workers keep every batch within ``b``;
* an aggregated pool does both on the same workers, and its prefills stall its
  decodes (a step that prefills is longer): with ``n`` workers each is busy
  prefilling ``u = rate * p / n`` of the time, so a token takes ``itl(c) / (1 - u)``
  with ``c`` requests decoding on it, and ``c = rate / n * osl * that`` (Little's
  law again, solved by iteration). The pool gets the fewest workers for which
  that ITL meets the target and ``u`` the TTFT bound (`aggregated_workers`).

Predictions are noisy interval to interval, so each pool is sized for the largest
demand of the last ``down_window`` intervals: it grows at once and shrinks only
once a peak has left the window (what Kubernetes' HPA calls a stabilization
window), which keeps the policy from flapping.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.planner.config import PlannerConfig, SlaPolicyConfig
from dynamo_gateway.planner.observe import Observation, PoolKey, Traffic
from dynamo_gateway.planner.policy import Demand
from dynamo_gateway.planner.predict import Predictor, make_predictor
from dynamo_gateway.planner.profile import Profile
from dynamo_gateway.protocol.engine import WorkerRole

MIN_UTILISATION = 0.05


@dataclass(frozen=True)
class Sizing:
    """Workers a model's predicted traffic needs, by pool kind (fractional)."""

    prefill: float
    decode: float
    utilisation: float  # planned prefill utilisation
    batch: int  # planned decode batch per worker
    feasible: bool  # False: the TTFT target is below the profile's prefill time


def size(
    profile: Profile, rate: float, isl: float, osl: float, ttft_s: float, itl_s: float,
    max_utilisation: float,
) -> Sizing:  # fmt: skip
    """The pure sizing rule of the module docstring."""
    p = profile.prefill_s(max(isl, 1.0))
    limit = min(max_utilisation, 1.0 - p / ttft_s)
    feasible = limit >= MIN_UTILISATION
    u = max(limit, MIN_UTILISATION)
    context = isl + osl / 2
    batch = profile.max_batch(itl_s, context)
    concurrent = rate * osl * profile.itl_s(batch, context)
    return Sizing(rate * p / u, concurrent / batch, u, batch, feasible)


MAX_WORKERS = 4096  # the search bound of `aggregated_workers`


def aggregated_workers(
    profile: Profile, rate: float, isl: float, osl: float, ttft_s: float, itl_s: float,
    max_utilisation: float,
) -> tuple[int, float, float]:  # fmt: skip
    """The fewest aggregated workers meeting both targets (see the module docstring),
    with their prefill utilisation and planned ITL; `MAX_WORKERS` when none does."""
    if rate <= 0:
        return 0, 0.0, 0.0
    p = profile.prefill_s(max(isl, 1.0))
    limit = max(min(max_utilisation, 1.0 - p / ttft_s), MIN_UTILISATION)
    context = isl + osl / 2
    n = max(1, math.ceil(rate * p / limit - 1e-9))
    while n < MAX_WORKERS:
        u = rate * p / n
        itl = profile.itl_s(1, context) / (1 - u)
        for _ in range(50):  # a fixed point: more decoding requests, a slower step
            concurrent = max(1.0, rate / n * osl * itl)
            new = profile.itl_s(concurrent, context) / (1 - u)
            if abs(new - itl) < 1e-6:
                break
            itl = new
        if itl <= itl_s:
            return n, u, itl
        n += 1
    return MAX_WORKERS, rate * p / MAX_WORKERS, float("inf")


@dataclass
class _Forecast:
    rate: Predictor
    isl: Predictor
    osl: Predictor

    def observe(self, traffic: Traffic) -> None:
        self.rate.observe(traffic.request_rate)
        if traffic.requests:  # lengths are unknown in an interval without requests
            self.isl.observe(traffic.mean_isl)
            self.osl.observe(traffic.mean_osl)


@dataclass
class SlaPolicy:
    config: PlannerConfig
    profiles: dict[str, Profile]
    _forecasts: dict[str, _Forecast] = field(default_factory=dict)
    _recent: dict[PoolKey, deque[int]] = field(default_factory=dict)

    @property
    def sla(self) -> SlaPolicyConfig:
        return self.config.sla

    def _forecast(self, model: str) -> _Forecast:
        f = self._forecasts.get(model)
        if f is None:
            name = self.sla.predictor
            f = self._forecasts[model] = _Forecast(
                make_predictor(name), make_predictor(name), make_predictor(name)
            )
        return f

    def demand(self, observation: Observation) -> dict[PoolKey, Demand]:
        out: dict[PoolKey, Demand] = {}
        for model in self.config.models:
            traffic = observation.traffic.get(model.name)
            if traffic is None:
                continue  # no frontend metrics this interval: keep the pools as they are
            f = self._forecast(model.name)
            f.observe(traffic)
            rate, isl, osl = f.rate.predict(), f.isl.predict(), f.osl.predict()
            profile = self.profiles[model.name]
            ttft, itl = model.ttft_ms / 1000, model.itl_ms / 1000
            predicted = {"request_rate": rate, "isl": isl, "osl": osl}
            head = f"predicted {rate:.2f} req/s, isl {isl:.0f}, osl {osl:.0f}: "
            if "aggregated" in model.pools:
                n, u, planned = aggregated_workers(
                    profile, rate, isl, osl, ttft, itl, self.sla.max_utilisation
                )
                facts = f"{head}{n} workers, {u:.0%} prefilling, ITL {1000 * planned:.1f} ms"
                demands = {PoolKey(model.name, WorkerRole.AGGREGATED): n}
            else:
                s = size(profile, rate, isl, osl, ttft, itl, self.sla.max_utilisation)
                facts = (
                    f"{head}prefill {s.prefill:.2f} workers at {s.utilisation:.0%}, decode "
                    f"{s.decode:.2f} at batch {s.batch}"
                    + ("" if s.feasible else " (TTFT target infeasible)")
                )
                demands = {
                    PoolKey(model.name, WorkerRole.PREFILL): _need(s.prefill),
                    PoolKey(model.name, WorkerRole.DECODE): _need(s.decode),
                }
            for key, workers in demands.items():
                recent = self._recent.setdefault(key, deque(maxlen=self.sla.down_window))
                recent.append(workers)
                held = max(recent)
                why = facts if held == workers else f"{facts}; held at {held} (down window)"
                out[key] = Demand(held, why, predicted)
        return out


def _need(x: float) -> int:
    return max(0, math.ceil(x - 1e-9))


def make_sla_policy(config: PlannerConfig) -> SlaPolicy:
    profiles: dict[str, Profile] = {}
    for model in config.models:
        if model.profile is None:
            raise ConfigError(
                f"the sla policy needs a profile for model {model.name} "
                "(`dynamo-gateway profile`, then profile = FILE in its [[models]] entry)"
            )
        profiles[model.name] = Profile.load(model.profile)
    return SlaPolicy(config, profiles)
