"""Built-in planner policies (`load`, `sla`) and connectors (`local`, `ray`, `kubernetes`)."""

from __future__ import annotations

from dynamo_gateway.hookspecs import hookimpl
from dynamo_gateway.planner.config import PlannerConfig
from dynamo_gateway.planner.connector import PlannerConnector
from dynamo_gateway.planner.policy import PlannerPolicy
from dynamo_gateway.registry import PlannerConnectorRegister, PlannerPolicyRegister


def _load(config: PlannerConfig) -> PlannerPolicy:
    from dynamo_gateway.planner.policies.load import make_load_policy

    return make_load_policy(config)


def _sla(config: PlannerConfig) -> PlannerPolicy:
    from dynamo_gateway.planner.policies.sla import make_sla_policy

    return make_sla_policy(config)


def _local(config: PlannerConfig) -> PlannerConnector:
    from dynamo_gateway.planner.connectors.local import make_local_connector

    return make_local_connector(config)


def _ray(config: PlannerConfig) -> PlannerConnector:
    from dynamo_gateway.planner.connectors.ray import make_ray_connector

    return make_ray_connector(config)


def _kubernetes(config: PlannerConfig) -> PlannerConnector:
    from dynamo_gateway.planner.connectors.kubernetes import make_kubernetes_connector

    return make_kubernetes_connector(config)


@hookimpl
def dynamo_gateway_register_planner_policies(register: PlannerPolicyRegister) -> None:
    register("load", _load, description="queue depth and KV usage, with hysteresis and cool-down")
    register("sla", _sla, description="predicted load sized by a profile to hold TTFT/ITL targets")


@hookimpl
def dynamo_gateway_register_planner_connectors(register: PlannerConnectorRegister) -> None:
    register("local", _local, description="`dynamo-gateway worker` processes on this host")
    register(
        "ray", _ray, description="workers as Ray actors on a Ray cluster ([plugin_config.ray])"
    )
    register(
        "kubernetes",
        _kubernetes,
        description="one Deployment per pool, scaled through the Kubernetes API",
    )
