"""The planner's settings: `dynamo-gateway planner --config FILE` (TOML) or its flags.

One file covers several models, each with pools per role (min/max workers),
SLA targets and the worker command, plus the global worker budget::

    interval_s = 5
    budget = 6                       # workers across every model
    policy = "load"                  # or "sla"
    connector = "local"

    [[models]]
    name = "demo"
    path = "models/demo"
    engine = "mocker"
    ttft_ms = 500
    itl_ms = 50
    worker_args = ["--speedup", "10"]
    pools = { aggregated = { min = 1, max = 4 } }
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.planner.observe import PoolKey
from dynamo_gateway.protocol.engine import WorkerRole

ROLES = ("aggregated", "prefill", "decode")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolLimits(_Strict):
    min: int = Field(1, ge=0)
    max: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> PoolLimits:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class ModelPlan(_Strict):
    """One served model the planner sizes."""

    name: str
    path: Path
    engine: str = "reference"
    pools: dict[str, PoolLimits] = Field(default_factory=lambda: {"aggregated": PoolLimits()})
    ttft_ms: float = Field(1000.0, gt=0, description="TTFT target (sla policy, attainment)")
    itl_ms: float = Field(100.0, gt=0, description="ITL target (sla policy, attainment)")
    worker_args: list[str] = Field(
        default_factory=list, description="extra `dynamo-gateway worker` flags"
    )
    profile: Path | None = Field(None, description="sla policy: `dynamo-gateway profile` output")

    @model_validator(mode="after")
    def _pools(self) -> ModelPlan:
        if not self.pools:
            raise ValueError(f"model {self.name}: no pools")
        unknown = set(self.pools) - set(ROLES)
        if unknown:
            raise ValueError(f"model {self.name}: unknown roles {sorted(unknown)} (want {ROLES})")
        if "aggregated" in self.pools and len(self.pools) > 1:
            raise ValueError(f"model {self.name}: aggregated and prefill/decode pools together")
        if "prefill" in self.pools and "decode" not in self.pools:
            raise ValueError(f"model {self.name}: a prefill pool needs a decode pool")
        serving = "aggregated" if "aggregated" in self.pools else "decode"
        if self.pools[serving].min < 1:
            raise ValueError(
                f"model {self.name}: the {serving} pool needs min >= 1 (one worker per model)"
            )
        return self

    def pool_keys(self) -> list[PoolKey]:
        return [PoolKey(self.name, WorkerRole(role)) for role in self.pools]


class LoadPolicyConfig(_Strict):
    """`[load]`: react to queue depth and KV utilisation, with hysteresis."""

    target_requests: float = Field(
        8.0, gt=0, description="requests (running + waiting) one worker should carry"
    )
    up_at: float = Field(0.9, gt=0, description="scale up above this share of the target")
    down_at: float = Field(
        0.5, gt=0, description="scale down when one fewer worker stays below this share"
    )
    kv_up_at: float = Field(0.9, gt=0, le=1, description="scale up above this KV usage")
    kv_down_at: float = Field(0.6, gt=0, le=1, description="and down only below this one")
    waiting_up: float = Field(
        1.0, ge=0, description="scale up while more than this many requests wait per worker"
    )
    up_intervals: int = Field(2, ge=1, description="consecutive intervals over before adding")
    down_intervals: int = Field(3, ge=1, description="consecutive intervals under before removing")
    max_step: int = Field(2, ge=1, description="workers added at most per decision")

    @model_validator(mode="after")
    def _hysteresis(self) -> LoadPolicyConfig:
        if self.down_at >= self.up_at or self.kv_down_at >= self.kv_up_at:
            raise ValueError("down thresholds must be below the up thresholds (hysteresis)")
        return self


class SlaPolicyConfig(_Strict):
    """`[sla]`: predict next-interval load and size pools from a profile."""

    predictor: Literal["constant", "moving_average", "holt"] = "holt"
    max_utilisation: float = Field(
        0.8, gt=0, le=1, description="a prefill pool is never planned busier than this"
    )
    down_window: int = Field(
        6,
        ge=1,
        description="a pool is sized for the largest demand of this many last intervals "
        "(grows at once, shrinks only when a peak has left the window)",
    )


class PlannerConfig(_Strict):
    interval_s: float = Field(5.0, gt=0)
    budget: int | None = Field(
        None, ge=1, description="workers across all models (None: sum of maxes)"
    )
    policy: str = "load"
    connector: str = "local"
    cooldown_s: float = Field(
        30.0, ge=0, description="no scale-down of a pool this long after it changed"
    )
    max_down_step: int = Field(1, ge=1, description="workers removed at most per decision")
    dry_run: bool = False
    discovery: str = "memory://"
    events: str = "memory://"
    frontends: list[str] = Field(
        default_factory=list, description="frontend base URLs whose /metrics give the traffic"
    )
    log_dir: Path | None = Field(None, description="local connector: worker logs (default: tmp)")
    models: list[ModelPlan] = Field(default_factory=list)
    load: LoadPolicyConfig = Field(default_factory=LoadPolicyConfig)
    sla: SlaPolicyConfig = Field(default_factory=SlaPolicyConfig)
    plugin_config: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _budget(self) -> PlannerConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("two models share a name")
        floor = sum(p.min for m in self.models for p in m.pools.values())
        if self.budget is not None and floor > self.budget:
            raise ValueError(f"the pools' minimums ({floor} workers) exceed the budget")
        return self

    @property
    def effective_budget(self) -> int:
        ceiling = sum(p.max for m in self.models for p in m.pools.values())
        return ceiling if self.budget is None else min(self.budget, ceiling)

    def model(self, name: str) -> ModelPlan:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def limits(self, key: PoolKey) -> PoolLimits:
        return self.model(key.model).pools[key.role.value]


def read_config_file(path: Path) -> dict[str, Any]:
    """The planner settings of a TOML file (its ``[planner]`` table, or the whole file)."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"planner config {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read planner config {path}: {exc}") from exc
    table = data.get("planner", data)
    if not isinstance(table, dict):
        raise ConfigError(f"planner config {path}: [planner] is not a table")
    return table


def load_config(path: Path | None, **overrides: Any) -> PlannerConfig:
    """The config file (if any) with `overrides` (from flags) on top."""
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if not data.get("models"):
        raise ConfigError("the planner needs at least one model (--model or [[models]])")
    try:
        return PlannerConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid planner config: {exc}") from exc
