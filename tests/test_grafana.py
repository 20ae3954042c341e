"""The Grafana dashboards in deploy/grafana: every one is on the Prometheus
datasource variable, and every metric its PromQL names is one the gateway
exports - read from the /metrics of an in-process gateway (kv router), worker
(prefill role, with a KV transfer agent and a host tier) and planner.

A counter counts as exported only with its ``_total`` suffix and a histogram
only as ``_bucket``/``_sum``/``_count``, as Prometheus stores them.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_gateway.frontend.app import build_app
from dynamo_gateway.planner.config import load_config
from dynamo_gateway.planner.loop import Planner
from dynamo_gateway.planner.policies.load import LoadPolicy
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.registry import Registry
from dynamo_gateway.runtime.discovery import MemoryDiscovery
from dynamo_gateway.runtime.events import MemoryEventPlane
from dynamo_gateway.runtime.worker import Worker
from dynamo_gateway.server import embedded
from dynamo_gateway.settings import load_settings

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))

# -- PromQL: the metric names an expression reads ------------------------------------------

# fmt: off
FUNCTIONS = frozenset((
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio", "abs", "absent",
    "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor",
    "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters",
    "double_exponential_smoothing", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate",
    "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sort_by_label",
    "sort_by_label_desc", "sqrt", "time", "timestamp", "vector", "year", "avg_over_time",
    "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time",
    "stddev_over_time", "stdvar_over_time", "last_over_time", "present_over_time",
    "mad_over_time",
))
KEYWORDS = frozenset((
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "group_left", "group_right",
))
# fmt: on

_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_TOKEN = re.compile(
    r"(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])*)"
    r"|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"|(?P<other>\S)"
)
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*\w+\s*\)\s*$")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names `expr` reads; ValueError for a function PromQL does not have."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(text)]
    if text.count("(") != text.count(")"):
        raise ValueError(f"unbalanced parentheses in {expr!r}")
    names: set[str] = set()
    for i, (kind, value) in enumerate(tokens):
        if kind != "ident" or value in KEYWORDS:
            continue
        if i + 1 < len(tokens) and tokens[i + 1][1] == "(":
            if value not in FUNCTIONS:
                raise ValueError(f"unknown PromQL function {value!r} in {expr!r}")
            continue
        names.add(value)
    return names


def test_promql_metric_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{model=~"$model", '
        'x="rate(b)"}[$__rate_interval]))) / ignoring (le) sum(c_total offset 5m) by (d) > 1e3'
    )
    assert promql_metric_names(expr) == {"a_bucket", "c_total"}
    assert promql_metric_names("max(x) and on (m) group_left (r) y * 2") == {"x", "y"}
    with pytest.raises(ValueError, match="rat"):
        promql_metric_names("rat(x[5m])")
    with pytest.raises(ValueError, match="unbalanced"):
        promql_metric_names("sum(rate(x[5m])")


# -- what the gateway exports -----------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
}


def exported_names(text: str) -> set[str]:
    """Series names a Prometheus scrape of `text` stores (families without samples too)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


async def _frontend_metrics(model: Path) -> str:
    settings = load_settings(engine="mocker", workers=2, models=[{"path": model, "name": "demo"}])
    async with embedded(settings) as gateway:
        transport = httpx.ASGITransport(app=build_app(gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            body = {"model": "demo", "prompt": "hello", "max_tokens": 4, "stream": True}
            assert (await client.post("/v1/completions", json=body)).status_code == 200
            return (await client.get("/metrics")).text


async def _worker_metrics(model: Path) -> str:
    settings = load_settings(
        engine="mocker",
        models=[{"path": model, "name": "demo"}],
        worker={"role": "prefill", "status_port": 0, "port": 0},
        kvbm={"host_cache_gb": 0.01},
    )
    worker = Worker(settings, load_plugins(entry_points=False))
    try:
        await worker.start()
        assert worker.status is not None
        url = f"{worker.status.address}/metrics"
        return await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
    finally:
        await worker.aclose()


def _planner_metrics(registry: Registry) -> str:
    config = load_config(None, models=[{"name": "demo", "path": "demo"}])
    connector = registry.planner_connectors.get("local")(config)
    planner = Planner(config, LoadPolicy(config.load), connector,
                      discovery=MemoryDiscovery(), events=MemoryEventPlane())  # fmt: skip
    return generate_latest(planner.metrics.registry).decode()


@pytest.fixture(scope="module")
def exported(demo_model: Path) -> set[str]:
    texts = [
        asyncio.run(_frontend_metrics(demo_model)),
        asyncio.run(_worker_metrics(demo_model)),
        _planner_metrics(load_plugins(entry_points=False).registry),
    ]
    names = set().union(*(exported_names(t) for t in texts))
    # The families the dashboards lean on are really there (not an empty scrape).
    for name in (
        "dynamo_gateway_requests_total",
        "dynamo_gateway_time_to_first_token_seconds_bucket",
        "dynamo_gateway_router_matched_blocks_total",
        "dynamo_gateway_worker_kv_transfer_seconds_bucket",
        "dynamo_gateway_worker_kv_tier_bytes_total",
        "dynamo_gateway_planner_desired_workers",
    ):
        assert name in names, name
    return names


# -- the dashboards -----------------------------------------------------------------------------


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def _queries(dashboard: dict[str, Any]) -> list[str]:
    """Every panel target's PromQL, and the metric of every label_values() variable."""
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = _LABEL_VALUES.match(query)
            assert match is not None, f"variable {var['name']}: not label_values(): {query}"
            exprs.append(match.group(1))
    return exprs


def test_there_are_dashboards_for_frontend_workers_and_planner() -> None:
    assert [p.name for p in DASHBOARDS] == [
        "dynamo-gateway-frontend.json",
        "dynamo-gateway-planner.json",
        "dynamo-gateway-workers.json",
    ]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_on_the_prometheus_datasource_variable(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 8
    for panel in graphs:
        assert panel["datasource"] == ds, panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"] == ds and t["expr"].strip() for t in panel["targets"])
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
    titles = [p["title"] for p in graphs]
    assert len(titles) == len(set(titles)), "panel titles must be unique"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_metric_a_dashboard_reads_is_exported(path: Path, exported: set[str]) -> None:
    used: dict[str, list[str]] = {}
    for expr in _queries(json.loads(path.read_text())):
        for name in promql_metric_names(expr):
            used.setdefault(name, []).append(expr)
    assert used
    missing = {name: exprs for name, exprs in used.items() if name not in exported}
    assert not missing, f"not exported by the gateway, a worker or the planner: {missing}"
