"""Hook specifications: the reference for plugin authors.

Every hook is named ``dynamo_gateway_*`` and is called once, synchronously, when
the plugin manager is built. Registration hooks receive a ``register``
callable and hand it *factories*, never live objects: building an engine,
opening a socket or importing CUDA happens later, inside the factory, when the
component is actually used. Listing plugins therefore never imports an engine.

``register(name, factory, description="")`` raises
:class:`~dynamo_gateway.errors.DuplicatePluginError` if another plugin already
registered ``name`` in the same family. Names are what users type after
``--engine``, ``--router`` and friends, or the scheme of a ``--discovery`` /
``--events`` URL.

A plugin is any module or object with functions decorated by
:data:`dynamo_gateway.hookimpl`, exposed through the ``dynamo_gateway``
entry-point group::

    [project.entry-points.dynamo_gateway]
    myengine = "dynamo_gateway_myengine.plugin"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from dynamo_gateway.registry import (
        CacheTierRegister,
        DiscoveryRegister,
        EngineRegister,
        EventPlaneRegister,
        KvTransportRegister,
        PlannerConnectorRegister,
        PlannerPolicyRegister,
        ReasoningParserRegister,
        RouterRegister,
        ToolParserRegister,
    )

PROJECT = "dynamo_gateway"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def dynamo_gateway_register_engines(register: EngineRegister) -> None:
    """Register inference engines.

    :param register: ``register(name, factory, description="")`` where
        ``factory(context: EngineContext) -> Engine`` builds one worker's engine.
        The engine implements :class:`dynamo_gateway.engines.base.Engine`:
        ``start()``, ``generate(request)`` (an async iterator of
        ``EngineOutput`` deltas), ``abort(request_id)``, ``check_health()``,
        ``load()`` and ``aclose()``. It publishes KV events through
        ``context.publish_kv_event`` when it caches or evicts blocks.

    Import the engine library inside ``factory``, not at module level. If the
    library is missing, raise :class:`~dynamo_gateway.errors.ConfigError` from
    the factory with a message that says what to install.

    All implementations are called; results are ignored.
    """


@hookspec
def dynamo_gateway_register_routers(register: RouterRegister) -> None:
    """Register routing policies.

    :param register: ``register(name, factory, description="")`` where
        ``factory(context: RouterContext) -> Router`` builds the policy for one
        model's worker pool. A :class:`dynamo_gateway.router.base.Router` gets
        ``select(request, workers)`` with the request's token ids and a
        :class:`~dynamo_gateway.router.base.WorkerView` (load, in-flight count,
        block size) of every eligible worker, plus lifecycle callbacks and the
        workers' KV events. It must not do I/O.

    All implementations are called; results are ignored.
    """


@hookspec
def dynamo_gateway_register_kv_transports(register: KvTransportRegister) -> None:
    """Register KV-cache transports, which move blocks between workers.

    :param register: ``register(name, factory, description="")`` where
        ``factory(context)`` builds a transport for one worker: it exposes the
        worker's KV memory to peers and reads remote blocks into local memory
        (in-process, shared memory, TCP, NIXL, ...). Disaggregated prefill and
        decode pick a transport by name.

    All implementations are called; results are ignored.
    """


@hookspec
def dynamo_gateway_register_cache_tiers(register: CacheTierRegister) -> None:
    """Register KV block storage tiers below device memory.

    :param register: ``register(name, factory, description="")`` where
        ``factory(context)`` builds a tier (host RAM, local disk, a remote
        store) that stores and returns blocks by sequence hash, within a
        capacity. The KV block manager offloads evicted blocks down the tiers
        and onboards them on a prefix hit.

    All implementations are called; results are ignored.
    """


@hookspec
def dynamo_gateway_register_discovery(register: DiscoveryRegister) -> None:
    """Register service-discovery backends, keyed by URL scheme.

    :param register: ``register(scheme, factory, description="")`` where
        ``factory(url: str, settings) -> Discovery`` connects to the backend
        named by ``--discovery scheme://...``. Discovery records which workers
        exist, for which model and role, at which address, under a lease that
        expires when the worker dies.

    All implementations are called; results are ignored.
    """


@hookspec
def dynamo_gateway_register_event_planes(register: EventPlaneRegister) -> None:
    """Register event-plane backends, keyed by URL scheme.

    :param register: ``register(scheme, factory, description="")`` where
        ``factory(url: str, settings) -> EventPlane`` connects to the backend
        named by ``--events scheme://...``. The event plane carries KV events
        and load metrics from workers to every router.

    All implementations are called; results are ignored.
    """


@hookspec
def dynamo_gateway_register_planner_connectors(register: PlannerConnectorRegister) -> None:
    """Register planner connectors, which add and remove workers.

    :param register: ``register(name, factory, description="")`` where
        ``factory(config: PlannerConfig) -> PlannerConnector`` builds a
        connector (`dynamo_gateway.planner.connector`) that starts workers of a
        pool and drains chosen ones on some substrate: local processes, a Ray
        cluster, Kubernetes. Removal must be a drain, never a kill.

    All implementations are called; results are ignored.
    """


@hookspec
def dynamo_gateway_register_planner_policies(register: PlannerPolicyRegister) -> None:
    """Register planner policies, which decide how many workers each pool needs.

    :param register: ``register(name, factory, description="")`` where
        ``factory(config: PlannerConfig) -> PlannerPolicy`` builds a policy
        (`dynamo_gateway.planner.policy`) whose ``demand(observation)`` maps
        each pool to the workers it should have. It must be pure of I/O (time
        comes in the observation); limits, cool-down and the global budget are
        applied after it by the planner.

    All implementations are called; results are ignored.
    """


@hookspec
def dynamo_gateway_register_tool_parsers(register: ToolParserRegister) -> None:
    """Register tool-call parsers, which find the calls in a model's output text.

    :param register: ``register(name, factory, description="")`` where
        ``factory(tools: list[dict] | None) -> ToolParser`` builds a parser
        (`dynamo_gateway.parsers.base`) for one request, given the request's
        OpenAI ``tools`` array (parsers that type arguments from the schemas
        need it). The parser's ``parse(text)`` returns the content and the
        ``ToolCall`` list; ``stream()`` returns a ``ToolStream`` whose
        ``feed(delta)`` and ``finish()`` return ``ContentDelta``,
        ``ToolCallStart`` and ``ToolArgumentsDelta`` pieces that add up to
        exactly what ``parse`` returns. Parsers are pure (no I/O) and must never
        raise on malformed model output: what is not a call is content.

    All implementations are called; results are ignored.
    """


@hookspec
def dynamo_gateway_register_reasoning_parsers(register: ReasoningParserRegister) -> None:
    """Register reasoning parsers, which split a model's thinking from its answer.

    :param register: ``register(name, factory, description="")`` where
        ``factory() -> ReasoningParser`` builds a parser
        (`dynamo_gateway.parsers.base`) for one request. Its ``parse(text)``
        returns ``(reasoning or None, content)``; ``stream()`` returns a
        ``ReasoningStream`` whose ``feed(delta)`` and ``finish()`` return
        ``("reasoning" | "content", text)`` pieces that add up to what
        ``parse`` returns; ``end_marker`` is the text that ends the reasoning,
        after which a structured-output constraint applies. Pure, and never
        raises on model output.

    All implementations are called; results are ignored.
    """
