"""The engine conformance suite: the `Engine` contract as tests any plugin can run.

A plugin package gets the suite by subclassing its base classes in one of its
own test modules and saying how to build its engine with one fixture::

    # tests/test_conformance.py of dynamo-gateway-myengine
    import pytest

    from dynamo_gateway.testing.conformance import (
        Capabilities,
        EngineConformance,
        EngineSpec,
        GatewayConformance,
    )


    @pytest.fixture(scope="class")
    def engine_spec(demo_model):
        return EngineSpec(
            engine="myengine",                      # the name your plugin registers
            model=demo_model,                       # any model your engine serves
            settings={"cache": {"num_kv_blocks": 256}},
            capabilities=Capabilities(deterministic_greedy=True, prefix_caching=True),
        )


    class TestMyEngine(EngineConformance):
        pass


    class TestMyEngineBehindTheGateway(GatewayConformance):
        pass

That is all: ``pytest`` runs every ``test_*`` method of the base classes against
the engine. Each class starts ONE engine (a class-scoped fixture on a
class-scoped event loop, since engines bind background tasks to the loop that
started them), so a model that takes 20 s to load loads once per class.
Requires ``pytest-asyncio`` >= 1.0 (any ``asyncio_mode``) and, for
`GatewayConformance`, ``httpx`` and ``openai``.

Fixtures
--------

``engine_spec`` (you provide it; class scope or wider)
    An `EngineSpec`: ``engine`` (a registered engine name) or ``factory`` (an
    `EngineFactory`, for an engine that is not installed as a plugin), the
    ``model`` path, ``settings`` (`load_settings` keyword overrides: ``cache``,
    ``plugin_config``, ``engine_args``, ...), the declared ``capabilities``, and
    optionally ``plugins`` (entry points to load), ``eos_prompt``,
    ``max_tokens_long`` (default 512) and ``timeout_s`` (default 30).

``engine_under_test`` (the suite provides it; override to build differently)
    A `RunningEngine` (``.engine``, ``.context``, ``.spec``, ``.events``: every
    `KvEvent` it published), built by `start_engine` as a worker builds one:
    an `EngineContext` with those settings, the model's `ModelCard`, the role
    ``aggregated`` and a recording ``publish_kv_event``.

``prefill_engine``, ``decode_engine`` (optional; only for ``disagg``)
    `RunningEngine` s with the prefill and decode roles, built from the spec
    and sharing one plugin registry (so the in-process transport connects
    them). Override either one, e.g. to use ``engine_under_test`` for the
    prefill leg when one engine serves both.

``gateway`` (`GatewayConformance` only; override to use a real server)
    A `GatewayUnderTest`: the real gateway app (`dynamo_gateway.server.embedded`
    + `build_app`) serving the spec's engine in-process through httpx's ASGI
    transport, as model ``conformance``, with an ``openai.AsyncOpenAI`` client.

Capabilities
------------

`Capabilities` fields default to ``False``; a test of an undeclared feature
is skipped with ``"<engine> does not declare <field>"``. ``deterministic_greedy``
(temperature 0 gives the same tokens whatever else runs and however the stream
is read) turns on the token-for-token comparisons; ``prefix_caching``,
``logprobs``, ``stop_token_ids``, ``eos``, ``kv_events``, ``kv_snapshot``,
``disagg``, ``structured_output`` and ``logit_bias`` turn on their own tests
(the last two also decide what is checked when they are off: that the engine
refuses such requests instead of ignoring them). An engine whose greedy tokens may change
with the batch at a near-tie (vLLM on CPU) sets ``greedy_tie_nats``: two runs
may then part where their tokens' logprobs are that close, checked by a probe
request with ``logprobs`` (`same_greedy`).

What `EngineConformance` checks
-------------------------------

Every stream the suite reads is also checked for its shape (`check_stream`):
at least one output, ``finish_reason`` on the last one only, ``cached_tokens``
an int on the first, ``logprobs`` only when asked for.

- ``max_tokens`` tokens exactly, ending with ``length`` (``ignore_eos``), also
  for ``max_tokens=1``;
- streaming gives deltas: several outputs for a long run; the tokens read by a
  slow consumer equal a fast one's (greedy);
- ``abort()`` mid-stream ends the stream with ``abort`` soon, and ``load()``
  goes back to idle; closing the generator early (``aclose()``) frees the
  request too, and its id can be used again; aborting an unknown or finished
  id does nothing to other requests;
- ``stop_token_ids`` end with ``stop`` at the first one, ``min_tokens`` holds
  them back; EOS ends with ``stop`` unless ``ignore_eos``;
- ``cached_tokens``: 0 for a new prompt; with prefix caching, the full blocks of
  a repeated prompt (and of a shared prefix) exactly;
- logprobs: one `TokenLogprob` per token, the sampled id, k alternatives in
  descending order, the greedy token the most likely;
- ``resumed_token_ids``: ``max_tokens`` counts the whole completion; greedy
  continues where the resumed tokens end;
- ``load()``: idle before, busy during, idle after; used blocks within the total;
- KV events: ids increase, the worker id is the context's, each `BlockStored`
  chains with `dynamo_gateway.kv.hashing.sequence_hashes` from its parent, and
  after a request the prompt's full blocks are cached in the events' view;
  ``kv_snapshot()`` equals that view at the last event id;
- concurrency: several requests at once each get their own complete output
  (equal to their solo runs, greedy);
- disaggregation: the prefill leg (``{"do_remote_decode": true}``) ends with
  ``length`` and hands back ``kv_transfer_params``; the decode leg given them
  yields the rest of the aggregated greedy run;
- structured output (`SamplingParams.constraint`): a JSON schema's output (nested
  object, array, enum, bounded integer, patterned string, all required) parses
  and validates against the schema (``jsonschema``), a regex's matches it whole,
  a choice's is one of the choices, each ending with ``stop``; a schema that is not
  even JSON raises `InvalidRequestError`;
- ``logit_bias`` (greedy): -100 on every token of a free run keeps them all out,
  +100 on one token makes every token that one; an id outside the vocabulary
  raises `InvalidRequestError`;
- an engine that does not declare ``structured_output`` (``logit_bias``) raises
  `InvalidRequestError` for a request with a constraint (a bias) rather than
  ignoring it.

What `GatewayConformance` checks (the frontend's side of the contract, where
stop strings, usage and ``n`` live) is listed in its docstring.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, cast

import pytest
import pytest_asyncio

from dynamo_gateway.disagg.params import decode_leg, prefill_leg
from dynamo_gateway.engines.base import EngineState
from dynamo_gateway.errors import InvalidRequestError
from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.plugins import Plugins
from dynamo_gateway.protocol.engine import (
    Constraint,
    EngineOutput,
    EngineRequest,
    FinishReason,
    WorkerRole,
)
from dynamo_gateway.protocol.kv_events import BlockStored
from dynamo_gateway.testing.engines import collect, engine_request, tokens_of
from dynamo_gateway.testing.gateway_suite import GatewayConformance, GatewayUnderTest
from dynamo_gateway.testing.harness import (
    Capabilities,
    EngineSpec,
    RunningEngine,
    cached_hashes,
    load_plugins_for,
    start_engine,
    wait_until,
)

__all__ = [
    "Capabilities",
    "EngineConformance",
    "EngineSpec",
    "GatewayConformance",
    "GatewayUnderTest",
    "RunningEngine",
    "cached_hashes",
    "check_stream",
    "require",
    "same_greedy",
    "start_engine",
]


def require(spec: EngineSpec, *capabilities: str) -> None:
    """Skip the calling test unless the spec declares every named capability."""
    missing = [name for name in capabilities if not getattr(spec.capabilities, name)]
    if missing:
        pytest.skip(f"{spec.engine_name} does not declare {', '.join(missing)}")


def check_stream(outputs: Sequence[EngineOutput], *, logprobs: bool = False) -> None:
    """The shape every stream has, whatever it was asked: see the module docstring."""
    assert outputs, "generate() ended without any output"
    reasons = [out.finish_reason for out in outputs]
    assert reasons[-1] is not None, f"the last output has no finish_reason: {outputs[-1]}"
    assert all(r is None for r in reasons[:-1]), f"finish_reason before the end: {reasons}"
    first = outputs[0].cached_tokens
    assert isinstance(first, int) and first >= 0, f"first output's cached_tokens: {first!r}"
    for out in outputs:
        if logprobs and out.finish_reason is not FinishReason.ABORT:
            assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids), out
        elif not logprobs:
            assert not out.logprobs, f"logprobs nobody asked for: {out}"


#: The structured-output tests' schema: nested, an array, an enum, all required, and
#: bounded (a patterned string, a bounded integer, few items), so that any engine ends
#: it within `STRUCTURED_MAX_TOKENS` tokens whatever its model prefers.
CONFORMANCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "inner": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
        },
    },
    "required": ["name", "age", "color", "flags", "inner"],
}
STRUCTURED_MAX_TOKENS = 256


def greedy(request_id: str, prompt: list[int], max_tokens: int, **sampling: Any) -> EngineRequest:
    """A greedy request that runs to `max_tokens` unless told otherwise."""
    sampling.setdefault("ignore_eos", True)
    return engine_request(request_id, prompt, max_tokens, temperature=0.0, **sampling)


async def run(
    running: RunningEngine, request: EngineRequest, *, logprobs: bool = False
) -> list[EngineOutput]:
    """The whole stream of `request`, within the spec's timeout, shape-checked."""
    async with asyncio.timeout(running.spec.timeout_s):
        outputs = await collect(running.engine, request)
    check_stream(outputs, logprobs=logprobs)
    return outputs


def decode(running: RunningEngine, tokens: list[int]) -> str:
    """The text of `tokens` (special tokens dropped), with the model's own tokenizer."""
    from dynamo_gateway.preprocess.tokenizer import Tokenizer

    return Tokenizer.from_dir(running.card.path).decode(tokens)


async def refused(running: RunningEngine, request: EngineRequest) -> InvalidRequestError:
    """The `InvalidRequestError` that `generate(request)` raises (fails if it serves it)."""
    async with asyncio.timeout(running.spec.timeout_s):
        try:
            outputs = await collect(running.engine, request)
        except InvalidRequestError as exc:
            assert exc.message, "an InvalidRequestError without a message"
            return exc
    raise AssertionError(f"served instead of refused: {tokens_of(outputs)}, {outputs[-1]}")


async def same_greedy(
    running: RunningEngine, context: list[int], expected: list[int], got: list[int]
) -> None:
    """Two greedy continuations of `context` agree token for token; or, for an engine
    with ``greedy_tie_nats``, until a near-tie: at their first difference both tokens
    are among the top alternatives there, at most that many nats apart."""
    n = min(len(expected), len(got))
    at = next((i for i in range(n) if expected[i] != got[i]), None)
    if at is None:
        assert expected[:n] == got[:n]
        return
    tolerance = running.capabilities.greedy_tie_nats
    assert tolerance > 0, f"greedy runs part at token {at}: {expected} vs {got}"
    require(running.spec, "logprobs")
    probe = greedy("tie-probe", context + expected[:at], 1, logprobs=5)
    (lp,) = [out.logprobs[0] for out in await run(running, probe, logprobs=True) if out.logprobs]
    top = dict(lp.top)
    assert expected[at] in top and got[at] in top, (
        f"greedy runs part at token {at} ({expected[at]} vs {got[at]}), not among "
        f"the top alternatives {lp.top}"
    )
    gap = abs(top[expected[at]] - top[got[at]])
    assert gap <= tolerance, f"greedy runs part at token {at} with a {gap:.3f}-nat gap"


@pytest.mark.asyncio(loop_scope="class")
class EngineConformance:
    """The `Engine` contract, against ``engine_under_test`` (see the module docstring)."""

    # -- fixtures ------------------------------------------------------------------------

    @pytest_asyncio.fixture(scope="class", loop_scope="class")
    @classmethod
    async def engine_under_test(cls, engine_spec: EngineSpec) -> AsyncIterator[RunningEngine]:
        async with start_engine(engine_spec, worker_id="conformance-aggregated") as running:
            yield running

    @pytest.fixture(scope="class")
    @classmethod
    def disagg_plugins(cls, engine_spec: EngineSpec) -> Plugins:
        """One registry for both disaggregated engines (their transports meet in it)."""
        require(engine_spec, "disagg")
        return load_plugins_for(engine_spec)

    @pytest_asyncio.fixture(scope="class", loop_scope="class")
    @classmethod
    async def prefill_engine(
        cls, engine_spec: EngineSpec, disagg_plugins: Plugins
    ) -> AsyncIterator[RunningEngine]:
        async with start_engine(
            engine_spec,
            role=WorkerRole.PREFILL,
            worker_id="conformance-prefill",
            plugins=disagg_plugins,
        ) as running:
            yield running

    @pytest_asyncio.fixture(scope="class", loop_scope="class")
    @classmethod
    async def decode_engine(
        cls, engine_spec: EngineSpec, disagg_plugins: Plugins
    ) -> AsyncIterator[RunningEngine]:
        async with start_engine(
            engine_spec,
            role=WorkerRole.DECODE,
            worker_id="conformance-decode",
            plugins=disagg_plugins,
        ) as running:
            yield running

    # -- the basics ----------------------------------------------------------------------

    async def test_running_and_healthy(self, engine_under_test: RunningEngine) -> None:
        engine = engine_under_test.engine
        assert engine.state is EngineState.RUNNING
        await engine.check_health()
        assert engine.block_size >= 1
        load = engine.load()
        assert load.kv_blocks_total >= load.kv_blocks_used >= 0

    @pytest.mark.parametrize("max_tokens", [1, 2, 17])
    async def test_max_tokens_exactly_then_length(
        self, engine_under_test: RunningEngine, max_tokens: int
    ) -> None:
        prompt = engine_under_test.prompt(f"length-{max_tokens}", 20)
        outputs = await run(engine_under_test, greedy(f"length-{max_tokens}", prompt, max_tokens))
        assert outputs[-1].finish_reason is FinishReason.LENGTH
        assert len(tokens_of(outputs)) == max_tokens

    async def test_streams_deltas(self, engine_under_test: RunningEngine) -> None:
        n = 64
        prompt = engine_under_test.prompt("deltas", 24)
        fast = await run(engine_under_test, greedy("deltas-fast", prompt, n))
        assert len(fast) > 1, "a 64-token run came back as one output: not streamed"
        assert len(tokens_of(fast)) == n
        # A slow consumer gets the same tokens, coalesced into fewer, larger deltas.
        slow: list[EngineOutput] = []
        async with asyncio.timeout(engine_under_test.spec.timeout_s):
            async for out in engine_under_test.engine.generate(greedy("deltas-slow", prompt, n)):
                slow.append(out)
                await asyncio.sleep(0.02)
        check_stream(slow)
        assert len(tokens_of(slow)) == n
        if engine_under_test.capabilities.deterministic_greedy:
            await same_greedy(engine_under_test, prompt, tokens_of(fast), tokens_of(slow))

    # -- abort ---------------------------------------------------------------------------

    async def test_abort_mid_stream(self, engine_under_test: RunningEngine) -> None:
        engine, spec = engine_under_test.engine, engine_under_test.spec
        prompt = engine_under_test.prompt("abort", 16)
        request = greedy("abort", prompt, spec.max_tokens_long)
        outputs: list[EngineOutput] = []
        async with asyncio.timeout(spec.timeout_s):
            async for out in engine.generate(request):
                outputs.append(out)
                if len(outputs) == 1:
                    await engine.abort("abort")
        check_stream(outputs)
        assert outputs[-1].finish_reason is FinishReason.ABORT
        assert len(tokens_of(outputs)) < spec.max_tokens_long
        await engine_under_test.settled_load()

    async def test_closing_the_stream_early_aborts(self, engine_under_test: RunningEngine) -> None:
        engine, spec = engine_under_test.engine, engine_under_test.spec
        prompt = engine_under_test.prompt("aclose", 16)
        stream = engine.generate(greedy("aclose", prompt, spec.max_tokens_long))
        async with asyncio.timeout(spec.timeout_s):
            first = await anext(stream)
            assert first.finish_reason is None
            # What the frontend does when its client goes away.
            await cast("AsyncGenerator[EngineOutput, None]", stream).aclose()
        await engine_under_test.settled_load()
        # The request is gone, so its id may be used again.
        again = await run(engine_under_test, greedy("aclose", prompt, 4))
        assert len(tokens_of(again)) == 4

    async def test_abort_of_unknown_or_finished_id_is_a_noop(
        self, engine_under_test: RunningEngine
    ) -> None:
        engine = engine_under_test.engine
        await engine.abort("never-seen")
        prompt = engine_under_test.prompt("noop", 16)
        await run(engine_under_test, greedy("noop-finished", prompt, 3))
        await engine.abort("noop-finished")

        async def other() -> list[EngineOutput]:
            return await run(engine_under_test, greedy("noop-other", prompt, 24))

        task = asyncio.create_task(other())
        await asyncio.sleep(0)
        await engine.abort("never-seen")
        await engine.abort("noop-finished")
        outputs = await task
        assert outputs[-1].finish_reason is FinishReason.LENGTH
        assert len(tokens_of(outputs)) == 24
        await engine.check_health()

    # -- stopping ------------------------------------------------------------------------

    async def test_stop_token_ids(self, engine_under_test: RunningEngine) -> None:
        require(engine_under_test.spec, "stop_token_ids")
        # A token that first appears at position k >= 1: greedy must stop right there.
        for attempt in range(4):
            prompt = engine_under_test.prompt(f"stop-ids-{attempt}", 20)
            free = tokens_of(
                await run(engine_under_test, greedy(f"stop-free-{attempt}", prompt, 24))
            )
            k = next((i for i in range(1, len(free)) if free[i] not in free[:i]), None)
            if k is not None:
                break
        else:
            pytest.skip(f"every greedy run repeats one token: {free}")
        stop = free[k]
        outputs = await run(
            engine_under_test, greedy("stop-ids", prompt, 24, stop_token_ids=(stop,))
        )
        tokens = tokens_of(outputs)
        assert outputs[-1].finish_reason is FinishReason.STOP
        assert tokens[-1] == stop and stop not in tokens[:-1]
        if engine_under_test.capabilities.deterministic_greedy:
            await same_greedy(engine_under_test, prompt, free[: k + 1], tokens)

    async def test_min_tokens_holds_stop_ids_back(self, engine_under_test: RunningEngine) -> None:
        require(engine_under_test.spec, "stop_token_ids")
        prompt = engine_under_test.prompt("min-tokens", 20)
        free = tokens_of(await run(engine_under_test, greedy("min-tokens-free", prompt, 1)))
        # The very first token is a stop id, but 4 tokens must come first.
        outputs = await run(
            engine_under_test,
            greedy("min-tokens", prompt, 24, stop_token_ids=(free[0],), min_tokens=4),
        )
        tokens = tokens_of(outputs)
        assert free[0] not in tokens[:4], tokens
        assert len(tokens) >= 4
        if outputs[-1].finish_reason is FinishReason.STOP:
            assert tokens[-1] == free[0] and len(tokens) >= 5
        else:
            assert outputs[-1].finish_reason is FinishReason.LENGTH and len(tokens) == 24

    async def test_eos_stops_unless_ignored(self, engine_under_test: RunningEngine) -> None:
        spec = engine_under_test.spec
        require(spec, "eos")
        eos = set(engine_under_test.card.eos_token_ids)
        assert eos, "the model card names no EOS token"
        n = min(spec.max_tokens_long, 64)
        probes = (
            [list(spec.eos_prompt)]
            if spec.eos_prompt is not None
            else [engine_under_test.prompt(f"eos-{i}", 8) for i in range(8)]
        )
        for i, prompt in enumerate(probes):
            # ignore_eos: runs through any EOS to max_tokens.
            ignored = await run(engine_under_test, greedy(f"eos-ignored-{i}", prompt, n))
            assert ignored[-1].finish_reason is FinishReason.LENGTH
            tokens = tokens_of(ignored)
            assert len(tokens) == n
            at = next((j for j, t in enumerate(tokens) if t in eos), None)
            if at is None:
                continue
            stopped = await run(engine_under_test, greedy(f"eos-{i}", prompt, n, ignore_eos=False))
            got = tokens_of(stopped)
            assert stopped[-1].finish_reason is FinishReason.STOP, got
            assert got[-1] in eos and not eos & set(got[:-1])
            if engine_under_test.capabilities.deterministic_greedy:
                await same_greedy(engine_under_test, prompt, tokens[: at + 1], got)
            return
        if spec.eos_prompt is not None:
            pytest.fail(f"eos_prompt met no EOS {sorted(eos)} in {n} greedy tokens")
        pytest.skip(f"no probe prompt met EOS in {n} greedy tokens (set EngineSpec.eos_prompt)")

    # -- prompts, caches, logprobs, resumption -------------------------------------------

    async def test_cached_tokens(self, engine_under_test: RunningEngine) -> None:
        bs = engine_under_test.engine.block_size
        prompt = engine_under_test.prompt("cached", 5 * bs + 3)
        first = await run(engine_under_test, greedy("cached-1", prompt, 2))
        assert first[0].cached_tokens == 0, "a prompt never seen before came from the cache"
        require(engine_under_test.spec, "prefix_caching")
        again = await run(engine_under_test, greedy("cached-2", prompt, 2))
        assert again[0].cached_tokens == 5 * bs, "a repeated prompt: its full blocks, cached"
        # A prompt sharing 3 full blocks reuses exactly those.
        fork = [*prompt[: 3 * bs], *engine_under_test.prompt("cached-fork", bs + 5)]
        forked = await run(engine_under_test, greedy("cached-3", fork, 2))
        assert forked[0].cached_tokens == 3 * bs

    async def test_logprobs(self, engine_under_test: RunningEngine) -> None:
        require(engine_under_test.spec, "logprobs")
        k = 2
        prompt = engine_under_test.prompt("logprobs", 20)
        outputs = await run(
            engine_under_test, greedy("logprobs", prompt, 8, logprobs=k), logprobs=True
        )
        for out in outputs:
            assert out.logprobs is not None
            for token, lp in zip(out.token_ids, out.logprobs, strict=True):
                assert lp.token_id == token
                assert lp.logprob <= 1e-6
                assert len(lp.top) == k, lp
                values = [v for _, v in lp.top]
                assert values == sorted(values, reverse=True), lp
                # Greedy: nothing is more likely than the token it picked.
                assert values[0] <= lp.logprob + 1e-4, lp
        plain = await run(engine_under_test, greedy("logprobs-none", prompt, 4))
        assert all(out.logprobs is None for out in plain)

    async def test_resumed_tokens_count_towards_max_tokens(
        self, engine_under_test: RunningEngine
    ) -> None:
        prompt = engine_under_test.prompt("resume", 20)
        full = tokens_of(await run(engine_under_test, greedy("resume-full", prompt, 12)))
        outputs = await run(engine_under_test, greedy("resume", prompt, 12, resumed=full[:4]))
        assert outputs[-1].finish_reason is FinishReason.LENGTH
        rest = tokens_of(outputs)
        assert len(rest) == 8, "max_tokens counts the resumed tokens too"
        if engine_under_test.capabilities.deterministic_greedy:
            await same_greedy(engine_under_test, prompt + full[:4], full[4:], rest)

    # -- load ----------------------------------------------------------------------------

    async def test_load_during_and_after(self, engine_under_test: RunningEngine) -> None:
        engine, spec = engine_under_test.engine, engine_under_test.spec
        idle = await engine_under_test.settled_load()
        assert idle.kv_blocks_total >= 0
        prompt = engine_under_test.prompt("load", 3 * engine.block_size)
        busy = False
        async with asyncio.timeout(spec.timeout_s):
            async for out in engine.generate(greedy("load", prompt, spec.max_tokens_long)):
                load = engine.load()
                assert 0 <= load.kv_blocks_used <= max(load.kv_blocks_total, load.kv_blocks_used)
                if load.kv_blocks_total:
                    assert load.kv_blocks_used <= load.kv_blocks_total, load
                if load.active_requests + load.waiting_requests >= 1:
                    busy = True
                    await engine.abort("load")
                assert out.finish_reason in (None, FinishReason.ABORT)
        assert busy, "load() never showed the running request"
        after = await engine_under_test.settled_load()
        assert after.kv_blocks_total == idle.kv_blocks_total

    # -- KV events -----------------------------------------------------------------------

    async def test_kv_events_describe_the_cache(self, engine_under_test: RunningEngine) -> None:
        require(engine_under_test.spec, "kv_events")
        bs = engine_under_test.engine.block_size
        prompt = engine_under_test.prompt("kv-events", 4 * bs + 5)
        await run(engine_under_test, greedy("kv-events", prompt, 3))
        want = sequence_hashes(prompt, bs)
        assert len(want) == 4
        events = engine_under_test.events
        # Engines that relay events from another process may deliver them late.
        await wait_until(
            lambda: set(want) <= cached_hashes(events), engine_under_test.spec.timeout_s
        )
        assert set(want) <= cached_hashes(events), "the prompt's full blocks were not stored"
        ids = [e.event_id for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), f"event ids: {ids}"
        for event in events:
            assert event.worker_id == engine_under_test.context.worker_id
            data = event.data
            if isinstance(data, BlockStored):
                assert data.block_size == bs
                assert len(data.token_ids) == len(data.block_hashes) * bs, data
                assert data.block_hashes == sequence_hashes(
                    data.token_ids, bs, parent=data.parent_block_hash
                ), "BlockStored hashes are not dynamo_gateway.kv.hashing sequence hashes"

    async def test_kv_snapshot_matches_the_events(self, engine_under_test: RunningEngine) -> None:
        require(engine_under_test.spec, "kv_events", "kv_snapshot")
        bs = engine_under_test.engine.block_size
        prompt = engine_under_test.prompt("kv-snapshot", 3 * bs + 1)
        await run(engine_under_test, greedy("kv-snapshot", prompt, 2))
        await engine_under_test.settled_load()
        snapshot = getattr(engine_under_test.engine, "kv_snapshot")()  # noqa: B009
        events = engine_under_test.events
        assert snapshot.worker_id == engine_under_test.context.worker_id
        assert events and snapshot.event_id == events[-1].event_id
        view: set[int] = set()
        for block in snapshot.blocks:
            view.update(block.block_hashes)
        assert view == cached_hashes(events)
        assert set(sequence_hashes(prompt, bs)) <= view

    # -- concurrency ---------------------------------------------------------------------

    async def test_concurrent_requests(self, engine_under_test: RunningEngine) -> None:
        lengths = [5, 9, 13, 17, 21, 25]
        prompts = [engine_under_test.prompt(f"concurrent-{i}", 10 + 3 * i) for i in range(6)]
        requests = [
            greedy(f"concurrent-{i}", p, n)
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
        ]
        results = await asyncio.gather(*(run(engine_under_test, r) for r in requests))
        for outputs, n in zip(results, lengths, strict=True):
            assert outputs[-1].finish_reason is FinishReason.LENGTH
            assert len(tokens_of(outputs)) == n
        if engine_under_test.capabilities.deterministic_greedy:
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
                alone = await run(engine_under_test, greedy(f"concurrent-alone-{i}", p, n))
                await same_greedy(engine_under_test, p, tokens_of(alone), tokens_of(results[i]))
        await engine_under_test.settled_load()

    # -- structured output and logit bias -------------------------------------------------

    async def _constrained(
        self, running: RunningEngine, tag: str, constraint: Constraint
    ) -> tuple[str, list[EngineOutput]]:
        prompt = running.prompt(tag, 16)
        request = greedy(tag, prompt, STRUCTURED_MAX_TOKENS, constraint=constraint)
        outputs = await run(running, request)
        return decode(running, tokens_of(outputs)), outputs

    async def test_json_schema_output_validates(self, engine_under_test: RunningEngine) -> None:
        require(engine_under_test.spec, "structured_output")
        jsonschema = pytest.importorskip("jsonschema")
        constraint = Constraint(kind="json_schema", spec=json.dumps(CONFORMANCE_SCHEMA))
        for i in range(2):
            text, outputs = await self._constrained(engine_under_test, f"schema-{i}", constraint)
            assert outputs[-1].finish_reason is FinishReason.STOP, text
            jsonschema.validate(json.loads(text), CONFORMANCE_SCHEMA)
        await engine_under_test.settled_load()

    async def test_regex_and_choice_hold(self, engine_under_test: RunningEngine) -> None:
        require(engine_under_test.spec, "structured_output")
        pattern = r"(yes|no)-[0-9]{3}"
        text, outputs = await self._constrained(
            engine_under_test, "regex", Constraint(kind="regex", spec=pattern)
        )
        assert outputs[-1].finish_reason is FinishReason.STOP, text
        assert re.fullmatch(pattern, text), text
        choices = ["red", "green", "blue", "not sure"]
        text, outputs = await self._constrained(
            engine_under_test, "choice", Constraint(kind="choice", spec=json.dumps(choices))
        )
        assert outputs[-1].finish_reason is FinishReason.STOP, text
        assert text in choices

    async def test_uncompilable_schema_is_refused(self, engine_under_test: RunningEngine) -> None:
        require(engine_under_test.spec, "structured_output")
        prompt = engine_under_test.prompt("bad-schema", 8)
        for i, spec in enumerate(['{"type": "object", "properties": ', '{"type": "objekt"}']):
            bad = Constraint(kind="json_schema", spec=spec)
            await refused(engine_under_test, greedy(f"bad-schema-{i}", prompt, 8, constraint=bad))
        await engine_under_test.engine.check_health()
        await engine_under_test.settled_load()

    async def test_logit_bias_bans_and_forces(self, engine_under_test: RunningEngine) -> None:
        require(engine_under_test.spec, "logit_bias")
        n = 8
        prompt = engine_under_test.prompt("bias", 16)
        free = tokens_of(await run(engine_under_test, greedy("bias-free", prompt, n)))
        banned = sorted(set(free))
        outputs = await run(
            engine_under_test,
            greedy("bias-ban", prompt, n, logit_bias=tuple((t, -100.0) for t in banned)),
        )
        got = tokens_of(outputs)
        assert len(got) == n and not set(got) & set(banned), (free, got)
        forced = free[-1]
        outputs = await run(
            engine_under_test, greedy("bias-force", prompt, n, logit_bias=((forced, 100.0),))
        )
        assert tokens_of(outputs) == [forced] * n
        vocab = engine_under_test.card.vocab_size
        if vocab:
            outside = greedy("bias-outside", prompt, n, logit_bias=((vocab + 7, 1.0),))
            exc = await refused(engine_under_test, outside)
            assert str(vocab + 7) in exc.message

    async def test_undeclared_features_are_refused(self, engine_under_test: RunningEngine) -> None:
        caps = engine_under_test.capabilities
        if caps.structured_output and caps.logit_bias:
            pytest.skip(f"{engine_under_test.spec.engine_name} declares both")
        prompt = engine_under_test.prompt("undeclared", 8)
        if not caps.structured_output:
            for constraint in (
                Constraint(kind="json_object"),
                Constraint(kind="regex", spec="a+"),
                Constraint(kind="choice", spec='["a"]'),
            ):
                rid = f"undeclared-{constraint.kind}"
                await refused(engine_under_test, greedy(rid, prompt, 4, constraint=constraint))
        if not caps.logit_bias:
            token = prompt[0]
            request = greedy("undeclared-bias", prompt, 4, logit_bias=((token, -100.0),))
            await refused(engine_under_test, request)
        await engine_under_test.engine.check_health()
        await engine_under_test.settled_load()

    # -- disaggregation ------------------------------------------------------------------

    async def test_disaggregated_legs(
        self,
        engine_under_test: RunningEngine,
        prefill_engine: RunningEngine,
        decode_engine: RunningEngine,
    ) -> None:
        require(engine_under_test.spec, "disagg")
        n = 12
        prompt = engine_under_test.prompt("disagg", 4 * engine_under_test.engine.block_size + 7)
        request = greedy("disagg", prompt, n)
        expected = tokens_of(await run(engine_under_test, request))
        first = await run(prefill_engine, prefill_leg(request))
        assert first[-1].finish_reason is FinishReason.LENGTH
        params = first[-1].kv_transfer_params
        assert isinstance(params, dict) and params, "the prefill leg handed back no params"
        head = tokens_of(first)
        assert len(head) == 1
        second = await run(decode_engine, decode_leg(request, head, params))
        assert second[-1].finish_reason is FinishReason.LENGTH
        got = head + tokens_of(second)
        assert len(got) == n
        if engine_under_test.capabilities.deterministic_greedy:
            await same_greedy(engine_under_test, prompt, expected, got)
        await prefill_engine.settled_load()
        await decode_engine.settled_load()
