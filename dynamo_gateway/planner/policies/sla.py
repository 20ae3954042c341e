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
* an aggregated pool carries both: the prefill share plus the decode share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.planner.config import ModelPlan, PlannerConfig, SlaPolicyConfig
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
            s = size(
                self.profiles[model.name], rate, isl, osl,
                model.ttft_ms / 1000, model.itl_ms / 1000, self.sla.max_utilisation,
            )  # fmt: skip
            predicted = {"request_rate": rate, "isl": isl, "osl": osl}
            facts = (
                f"predicted {rate:.2f} req/s, isl {isl:.0f}, osl {osl:.0f}: prefill "
                f"{s.prefill:.2f} workers at {s.utilisation:.0%}, decode {s.decode:.2f} "
                f"at batch {s.batch}" + ("" if s.feasible else " (TTFT target infeasible)")
            )
            out.update(_pools(model, s, facts, predicted))
        return out


def _pools(
    model: ModelPlan, s: Sizing, facts: str, predicted: dict[str, float]
) -> dict[PoolKey, Demand]:
    def need(x: float) -> int:
        return max(0, math.ceil(x - 1e-9))

    if "aggregated" in model.pools:
        key = PoolKey(model.name, WorkerRole.AGGREGATED)
        return {key: Demand(need(s.prefill + s.decode), facts, predicted)}
    return {
        PoolKey(model.name, WorkerRole.PREFILL): Demand(need(s.prefill), facts, predicted),
        PoolKey(model.name, WorkerRole.DECODE): Demand(need(s.decode), facts, predicted),
    }


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
