"""Built-in routing policies: load-only ones and `kv` (KV-cache aware)."""

from __future__ import annotations

from dynamo_gateway.hookspecs import hookimpl
from dynamo_gateway.registry import RouterRegister
from dynamo_gateway.router.base import Router, RouterContext
from dynamo_gateway.router.policies import LeastLoadedRouter, RandomRouter, RoundRobinRouter


def _round_robin(context: RouterContext) -> Router:
    return RoundRobinRouter()


def _random(context: RouterContext) -> Router:
    return RandomRouter()


def _least_loaded(context: RouterContext) -> Router:
    return LeastLoadedRouter()


def _kv(context: RouterContext) -> Router:
    from dynamo_gateway.router.kv import KvRouter

    return KvRouter(context.block_size, context.settings.kv_router)


@hookimpl
def dynamo_gateway_register_routers(register: RouterRegister) -> None:
    register("round_robin", _round_robin, description="cycle through the workers")
    register("random", _random, description="pick a worker uniformly at random")
    register(
        "least_loaded",
        _least_loaded,
        description="fewest outstanding requests, then lowest KV usage",
    )
    register(
        "kv",
        _kv,
        description="KV-cache overlap weighed against load (Dynamo's cost), session affinity",
    )
