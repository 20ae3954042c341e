"""The `ray` connector's settings (``[plugin_config.ray]``), checked without Ray running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.planner.config import PlannerConfig, load_config
from dynamo_gateway.planner.connector import new_worker_id
from dynamo_gateway.planner.connectors.ray import (
    RayConnector,
    RaySettings,
    make_ray_connector,
    pool_of,
)
from dynamo_gateway.planner.observe import PoolKey
from dynamo_gateway.protocol.engine import WorkerRole


def config(ray: dict[str, Any] | None = None) -> PlannerConfig:
    return PlannerConfig(
        connector="ray",
        models=[{"name": "m", "path": "m"}],
        plugin_config={} if ray is None else {"ray": ray},
    )


def test_defaults_spread_small_workers_over_the_local_cluster() -> None:
    s = make_ray_connector(config()).settings
    assert s == RaySettings()
    assert (s.address, s.scheduling, s.runtime_env, s.resources) == ("auto", "SPREAD", {}, {})
    assert 8 * s.num_cpus <= 2  # eight workers fit on a 2-CPU node
    assert s.num_gpus == 0


def test_the_toml_table_reaches_the_connector(tmp_path: Path) -> None:
    path = tmp_path / "planner.toml"
    path.write_text(
        'connector = "ray"\n'
        "[plugin_config.ray]\n"
        'address = "10.0.0.1:6379"\n'
        'namespace = "serving"\n'
        "num_cpus = 1\n"
        "num_gpus = 1\n"
        'scheduling = "DEFAULT"\n'
        "resources = { accelerator_h100 = 1 }\n"
        'runtime_env = { env_vars = { HF_HOME = "/models" }, pip = ["x==1"] }\n'
        "[[models]]\n"
        'name = "m"\n'
        'path = "m"\n'
    )
    s = make_ray_connector(load_config(path)).settings
    assert (s.address, s.namespace, s.num_cpus, s.num_gpus) == ("10.0.0.1:6379", "serving", 1, 1)
    assert s.scheduling == "DEFAULT"
    assert s.resources == {"accelerator_h100": 1.0}
    # Passed through to Ray as given.
    assert s.runtime_env == {"env_vars": {"HF_HOME": "/models"}, "pip": ["x==1"]}


@pytest.mark.parametrize(
    ("ray", "match"),
    [
        ({"adress": "x:1"}, "adress"),  # a typo is an error, not a silent default
        ({"scheduling": "PACK"}, "scheduling"),
        ({"num_cpus": -1}, "num_cpus"),
        ({"resources": {"GPU": 1}}, "num_gpus"),
        ({"resources": {"CPU": 1, "x": 1}}, r"\['CPU'\]"),
        ({"resources": {"x": -1}}, "negative"),
        ({"namespace": ""}, "namespace"),
        ({"kill_after_s": 0}, "kill_after_s"),
        ({"runtime_env": "conda"}, "runtime_env"),
    ],
)
def test_bad_settings_are_config_errors(ray: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=r"invalid \[plugin_config\.ray\]") as info:
        make_ray_connector(config(ray))
    assert info.match(match)


def test_the_registered_connector_builds_this_one_without_importing_ray() -> None:
    # In a fresh interpreter: this one may have imported ray for another test.
    code = (
        "import sys\n"
        "from dynamo_gateway.plugins import load_plugins\n"
        "from dynamo_gateway.planner.config import PlannerConfig\n"
        "from dynamo_gateway.planner.connectors.ray import RayConnector\n"
        "c = PlannerConfig(connector='ray', models=[{'name': 'm', 'path': 'm'}])\n"
        "factory = load_plugins(entry_points=False).registry.planner_connectors.get('ray')\n"
        "assert isinstance(factory(c), RayConnector)\n"
        "assert 'ray' not in sys.modules, 'ray imported before start()'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert isinstance(make_ray_connector(config()), RayConnector)


@pytest.mark.parametrize(
    ("worker_id", "pool"),
    [
        ("demo-aggregated-1a2b3c4d", PoolKey("demo", WorkerRole.AGGREGATED)),
        ("my-model-v2-prefill-1a2b3c4d", PoolKey("my-model-v2", WorkerRole.PREFILL)),
        ("demo-bogus-1a2b3c4d", None),
        ("-decode-1a2b3c4d", None),
        ("nodash", None),
    ],
)
def test_a_left_over_actor_is_adopted_by_the_pool_its_name_says(
    worker_id: str, pool: PoolKey | None
) -> None:
    assert pool_of(worker_id) == pool
    if pool is not None:  # what the connector names its workers
        assert pool_of(new_worker_id(pool, "1a2b3c4d")) == pool
