"""Prometheus metrics of the frontend, in a registry per app (tests build many apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "dynamo_gateway"

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15,
    0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip


@dataclass
class ModelMetrics:
    """Label-bound children for one model: resolved once, cheap on the hot path."""

    ttft: Histogram
    itl: Histogram
    input_tokens: Counter
    output_tokens: Counter
    cached_tokens: Counter
    inflight: Gauge


@dataclass
class FrontendMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests handled, by model, endpoint and status code",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Requests that ended in an error, by error type",
            ["type"],
            registry=r,
        )
        self.inflight = Gauge(
            f"{PREFIX}_inflight_requests", "Requests in flight, by model", ["model"], registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between streamed chunks, divided by the tokens in the chunk",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.input_tokens = Counter(
            f"{PREFIX}_input_tokens", "Prompt tokens", ["model"], registry=r
        )
        self.output_tokens = Counter(
            f"{PREFIX}_output_tokens", "Generated tokens", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            f"{PREFIX}_cached_tokens",
            "Prompt tokens served from the prefix cache",
            ["model"],
            registry=r,
        )
        self._models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> ModelMetrics:
        m = self._models.get(name)
        if m is None:
            m = self._models[name] = ModelMetrics(
                ttft=self.ttft.labels(name),
                itl=self.itl.labels(name),
                input_tokens=self.input_tokens.labels(name),
                output_tokens=self.output_tokens.labels(name),
                cached_tokens=self.cached_tokens.labels(name),
                inflight=self.inflight.labels(name),
            )
        return m

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Add metrics computed at scrape time (worker load, worker counts)."""
        self.registry.register(_FnCollector(collect))


class _FnCollector(Collector):
    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = fn

    def collect(self) -> Iterable[Metric]:
        return self._fn()


def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    """A counter kept elsewhere (read at scrape time); `name` without ``_total``."""
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
