"""What the conformance suites build an engine from, and the engine they build.

`EngineSpec` names an engine (a registered name or a factory), the model it
serves, `Settings` overrides and the engine's declared `Capabilities`.
`start_engine(spec)` builds it exactly as a worker would (an `EngineContext`
with that settings object, the model's `ModelCard`, a worker id, a role, the
plugin registry) with a KV-event sink that records what it publishes, starts
it, and closes it at the end. The result is a `RunningEngine`.

These are plain helpers: `dynamo_gateway.testing.conformance` uses them, and a
plugin's own tests may too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamo_gateway.engines.base import Engine, EngineContext, EngineFactory
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.plugins import Plugins, load_plugins
from dynamo_gateway.protocol.engine import LoadMetrics, WorkerRole
from dynamo_gateway.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
)
from dynamo_gateway.registry import EngineRegister
from dynamo_gateway.settings import Settings, load_settings

__all__ = [
    "Capabilities",
    "EngineSpec",
    "RunningEngine",
    "cached_hashes",
    "load_plugins_for",
    "start_engine",
    "wait_until",
]

# The name a spec's `factory` is registered under (and the gateway suite serves).
FACTORY_ENGINE_NAME = "conformance-engine"


@dataclass(frozen=True)
class Capabilities:
    """What an engine declares it does beyond the core contract.

    The core contract is always tested: exact ``max_tokens`` with ``length``,
    deltas, one final output, abort and early close, ``resumed_token_ids``
    counting towards ``max_tokens``, ``load()``, concurrency. A test of a
    feature left ``False`` here is skipped with a reason naming the field;
    an undeclared feature that happens to work is fine.
    """

    # temperature 0 gives the same tokens for the same prompt every time: alone or
    # batched with others, read fast or slowly, resumed or not. Enables the checks
    # that compare two runs token for token (and the gateway's stop-string test).
    deterministic_greedy: bool = False
    # Engines whose kernels are not batch-invariant (vLLM on CPU): two greedy runs of
    # one prompt may part where the top two tokens are this close (in logprob, nats),
    # batch shapes changing the last bits of the logits. The token-for-token checks
    # then accept a first divergence at such a near-tie (checked with `logprobs`,
    # which the engine must declare) and nothing else. 0: identical, always.
    greedy_tie_nats: float = 0.0
    # A repeated prompt reuses the KV of its full blocks: `cached_tokens` > 0.
    prefix_caching: bool = False
    # SamplingParams.logprobs = k gives a `TokenLogprob` per token with k alternatives.
    logprobs: bool = False
    # SamplingParams.stop_token_ids end a request with STOP (the stop token is the last
    # one emitted), and `min_tokens` holds them back.
    stop_token_ids: bool = False
    # The model's EOS (ModelCard.eos_token_ids) ends a request with STOP unless
    # `ignore_eos`. Tested on `EngineSpec.eos_prompt` or, without one, on probe prompts
    # (skipped if none of them meets EOS).
    eos: bool = False
    # The engine publishes KV events through EngineContext.publish_kv_event, keyed by
    # `dynamo_gateway.kv.hashing` sequence hashes.
    kv_events: bool = False
    # It implements the optional `kv_snapshot()` (consistent with its events).
    kv_snapshot: bool = False
    # Prefill and decode roles: the legs of docs/disaggregation.md.
    disagg: bool = False
    # SamplingParams.constraint is enforced (json_schema, json_object, regex, choice,
    # grammar): the output matches and the request ends with STOP when it is complete;
    # an uncompilable one is refused with InvalidRequestError. Without it, the engine
    # must refuse every constrained request with InvalidRequestError.
    structured_output: bool = False
    # SamplingParams.logit_bias is applied: -100 bans a token, +100 forces it (greedy).
    # Without it, the engine must refuse a request with a logit_bias.
    logit_bias: bool = False


@dataclass(frozen=True)
class EngineSpec:
    """How the suites build the engine under test.

    Give either ``engine`` (a name registered through the ``dynamo_gateway``
    entry points, what ``--engine`` takes) or ``factory`` (an `EngineFactory`,
    registered for the run under ``conformance-engine``).
    """

    model: Path  # the model directory (or .gguf file) the engine serves
    engine: str | None = None
    factory: EngineFactory | None = None
    # `load_settings` keyword overrides, e.g. {"cache": {"num_kv_blocks": 256},
    # "plugin_config": {"myengine": {...}}, "engine_args": [...]}.
    settings: Mapping[str, Any] = field(default_factory=dict)
    capabilities: Capabilities = field(default_factory=Capabilities)
    # Entry-point plugins to load (None: every installed one; the built-ins always load).
    plugins: Sequence[str] | None = None
    # A prompt whose greedy continuation reaches EOS within `max_tokens_long` tokens.
    eos_prompt: Sequence[int] | None = None
    # Tokens for the requests that must still be running when the test acts (abort,
    # early close, load during a request). Keep prompt + this within the context.
    max_tokens_long: int = 512
    # Seconds any single wait may take (a stream to end, load to settle, an event).
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if (self.engine is None) == (self.factory is None):
            raise ValueError("EngineSpec needs exactly one of `engine` and `factory`")

    @property
    def engine_name(self) -> str:
        return self.engine if self.engine is not None else FACTORY_ENGINE_NAME

    def build_settings(self, **extra: Any) -> Settings:
        return load_settings(**{"engine": self.engine_name, **self.settings, **extra})


def _factory_plugin(factory: EngineFactory) -> type:
    """A throwaway plugin registering a spec's factory (the way tests add engines)."""
    from dynamo_gateway import hookimpl

    class FactoryPlugin:
        @staticmethod
        @hookimpl
        def dynamo_gateway_register_engines(register: EngineRegister) -> None:
            register(FACTORY_ENGINE_NAME, factory, description="the engine under test")

    return FactoryPlugin


def load_plugins_for(spec: EngineSpec) -> Plugins:
    """The plugin registry the spec's engine is found in."""
    if spec.factory is None:
        return load_plugins(only=spec.plugins)
    plugin = _factory_plugin(spec.factory)
    return load_plugins(only=spec.plugins, extra=[(plugin, "conformance")])


class _EventLog:
    """The KV-event sink handed to the engine: keeps every event, in order."""

    def __init__(self) -> None:
        self.events: list[KvEvent] = []

    def __call__(self, event: KvEvent) -> None:
        self.events.append(event)


@dataclass
class RunningEngine:
    """A started engine, its context, and every KV event it published so far."""

    engine: Engine
    context: EngineContext
    spec: EngineSpec
    events: list[KvEvent]

    @property
    def capabilities(self) -> Capabilities:
        return self.spec.capabilities

    @property
    def card(self) -> ModelCard:
        return self.context.model

    def prompt(self, tag: str, length: int) -> list[int]:
        """`length` token ids, the same for the same `tag`, different for another.

        Drawn from the model's vocabulary without its lowest ids (often special
        tokens) and without EOS, so the prompt means nothing but is valid input.
        """
        vocab = self.card.vocab_size or 32000
        low = min(16, vocab // 4)
        eos = set(self.card.eos_token_ids)
        rng = random.Random(f"dynamo-gateway-conformance/{tag}")
        out: list[int] = []
        while len(out) < length:
            token = rng.randrange(low, vocab)
            if token not in eos:
                out.append(token)
        return out

    async def settled_load(self, *, timeout: float | None = None) -> LoadMetrics:
        """`load()` once nothing is running or waiting (engines may report late)."""
        ok = await wait_until(
            lambda: _idle(self.engine.load()), timeout or self.spec.timeout_s, interval=0.02
        )
        load = self.engine.load()
        if not ok:
            raise AssertionError(f"load() never went back to idle: {load}")
        return load


def _idle(load: LoadMetrics) -> bool:
    return load.active_requests == 0 and load.waiting_requests == 0 and load.kv_blocks_used == 0


async def wait_until(check: Callable[[], bool], timeout: float, *, interval: float = 0.01) -> bool:
    """Poll `check` on this loop until it holds (True) or `timeout` passes (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


def cached_hashes(events: Iterable[KvEvent]) -> set[int]:
    """The block hashes a consumer of `events` believes the worker caches."""
    view: set[int] = set()
    for event in events:
        data = event.data
        if isinstance(data, BlockStored):
            view.update(data.block_hashes)
        elif isinstance(data, BlockRemoved):
            view.difference_update(data.block_hashes)
        elif isinstance(data, AllBlocksCleared):
            view.clear()
    return view


@contextlib.asynccontextmanager
async def start_engine(
    spec: EngineSpec,
    *,
    role: WorkerRole = WorkerRole.AGGREGATED,
    worker_id: str | None = None,
    plugins: Plugins | None = None,
) -> AsyncIterator[RunningEngine]:
    """Build the spec's engine as a worker would, start it, yield it, close it.

    Engines of one test that must reach each other (a prefill and a decode
    worker over the in-process transport) share `plugins`.
    """
    plugins = plugins or load_plugins_for(spec)
    settings = spec.build_settings()
    card = ModelCard.load(spec.model, max_model_len=settings.max_model_len)
    log = _EventLog()
    context = EngineContext(
        settings,
        card,
        worker_id or f"conformance-{spec.engine_name}-{role.value}",
        role=role,
        publish_kv_event=log,
        registry=plugins.registry,
    )
    engine = plugins.registry.engines.get(spec.engine_name)(context)
    await engine.start()
    try:
        yield RunningEngine(engine, context, spec, log.events)
    finally:
        await engine.aclose()
