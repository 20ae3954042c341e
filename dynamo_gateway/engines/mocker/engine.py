"""The mocker engine: continuous batching over a simulated KV cache, without a model.

It schedules like a real paged-attention engine, with the same `Scheduler`
as the reference engine (FIFO admission, chunked prefill, one decode token per
running sequence per step, preemption by recompute), keeps a real prefix cache
with real KV events, and sleeps for each step as long as `TimingModel` says,
divided by ``speedup``. Output is
readable words from the model's tokenizer (`text.py`). It exists for testing
and scale experiments: hundreds of engines can share one event loop.

KV tiers (``[kvbm]``) are simulated (`dynamo_gateway.kvbm.tiers.sim`): the
capacities ``[kvbm]`` gives, the read speeds of ``[mocker]`` (``host_tier_gbps``,
``disk_tier_gbps``, ``remote_tier_gbps`` and per-block latencies) charged as
simulated onboarding time; writes cost nothing (they are asynchronous in a real
engine). A shared tier is shared by the mocker workers of one process.

Generation ends at ``max_tokens`` or at the context window (both
`FinishReason.LENGTH`); the mocker never emits EOS, so ``ignore_eos``,
``min_tokens`` and ``stop_token_ids`` are accepted and have nothing to do.

Structured output and ``logit_bias`` are honoured (`constrained.py`): a request
with either picks its tokens among those the grammar and the bias allow, still
one word-stream draw per token (greedy output stays a function of the context),
steering toward the grammar's end; it ends with STOP right after the token that
completes the grammar. Requests without them take the plain path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, ClassVar, cast

from dynamo_gateway.disagg.layout import KvLayout
from dynamo_gateway.engines.base import EngineContext, EngineState
from dynamo_gateway.engines.mocker.constrained import Picker, token_classes
from dynamo_gateway.engines.mocker.text import TokenStream, WordSource, load_word_source
from dynamo_gateway.engines.mocker.timing import TimingModel
from dynamo_gateway.engines.scheduled import ScheduledEngine, WaitingSeq
from dynamo_gateway.engines.scheduler import Scheduler, SeqStatus, StepPlan
from dynamo_gateway.errors import EngineError
from dynamo_gateway.kv.block_manager import BlockManager
from dynamo_gateway.kvbm.build import tier_names
from dynamo_gateway.kvbm.manager import OnboardPlan, TieredCache
from dynamo_gateway.kvbm.policy import parse_offload_policy
from dynamo_gateway.kvbm.record import namespace_of
from dynamo_gateway.kvbm.tier import CacheTier
from dynamo_gateway.kvbm.tiers.sim import SimTier
from dynamo_gateway.protocol.engine import EngineRequest, FinishReason

if TYPE_CHECKING:
    from dynamo_gateway.engines.constraints import ConstraintCompiler

__all__ = ["MockerEngine"]

log = logging.getLogger(__name__)

# Event-loop timers have about 1 ms resolution (epoll rounds up), so shorter steps
# only yield to other tasks and carry their time on the simulated clock until it is
# this far ahead of the wall clock.
_MIN_SLEEP_S = 1e-3
# Oversleeping up to this much is made up by running the next steps back to back.
_MAX_LAG_S = 5e-3
# Steps run back to back while behind schedule yield to the loop at least this often.
_MAX_BURST_S = 2e-3

# KV capacity when `cache.num_kv_blocks` is not set: room for a busy worker.
DEFAULT_KV_BLOCKS = 16384

_RUNNING = SeqStatus.RUNNING
_NO_BYTES = memoryview(b"")
GIB = 1 << 30


class _Request(WaitingSeq):
    """One request: the scheduler's `Seq` plus its word stream (and its `Picker` when
    it has a logit bias or a constraint)."""

    __slots__ = ("picker", "stream", "top_k")

    def __init__(
        self,
        request_id: str,
        tokens: list[int],
        remaining: int,
        stream: TokenStream,
        top_k: int | None,
        picker: Picker | None = None,
    ) -> None:
        super().__init__(request_id, tokens, remaining, logprobs=top_k is not None)
        self.stream = stream
        self.top_k = top_k  # None: no logprobs
        self.picker = picker


class MockerEngine(ScheduledEngine):
    """A simulated engine for one worker; `MockerEngine(context)` is an `EngineFactory`."""

    kind = "mocker"
    supports_structured_output: ClassVar[bool] = True
    supports_logit_bias: ClassVar[bool] = True

    def __init__(self, context: EngineContext) -> None:
        super().__init__(context)
        sched = context.settings.scheduler
        cache = context.settings.cache
        self._timing = TimingModel.from_settings(context.settings.mocker)
        self._blocks = BlockManager(
            cache.num_kv_blocks or DEFAULT_KV_BLOCKS,
            cache.block_size,
            record_events=self._events.enabled,
        )
        self._sched = Scheduler(
            self._blocks,
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            max_model_len=context.model.max_model_len,
        )
        self._words: WordSource | None = None
        self._clock = 0.0  # loop time at which the simulated step in flight ends
        self._block_bytes = 0  # simulated bytes of one KV block (set with tiers)

    @property
    def block_manager(self) -> BlockManager:
        """The simulated KV cache (read it, don't change it)."""
        return self._blocks

    async def start(self) -> None:
        if self._state is EngineState.RUNNING:
            return
        if self._state is not EngineState.CREATED:
            raise EngineError(f"mocker engine {self._worker_id} cannot start: {self._state.value}")
        self._state = EngineState.STARTING
        model = self._context.model
        try:
            # Scanning a large vocabulary takes a moment; keep the loop free meanwhile.
            self._words = await asyncio.to_thread(
                load_word_source,
                model.path,
                vocab_size=model.vocab_size,
                eos_token_ids=model.eos_token_ids,
            )
        except BaseException as exc:
            self._state = EngineState.FAILED
            self._failure = exc
            raise
        mocker = self._context.settings.mocker
        layout = KvLayout(
            num_layers=mocker.kv_layers,
            num_kv_heads=mocker.kv_heads,
            head_dim=mocker.kv_head_dim,
            block_size=self._block_size,
            dtype="bfloat16",
        )
        # Transfers take simulated time like steps do: bandwidth times the speedup.
        agent = self._new_agent(layout, simulated_gbps=mocker.kv_transfer_gbps * mocker.speedup)
        if agent is not None:
            try:
                await self._start_agent(agent, None)
            except BaseException as exc:
                self._state = EngineState.FAILED
                self._failure = exc
                await agent.aclose()
                raise
        self._start_tiers(layout)
        self._start_loop()

    def _start_tiers(self, layout: KvLayout) -> None:
        """Simulated KV tiers for what ``[kvbm]`` names (`dynamo_gateway.kvbm.tiers.sim`)."""
        settings = self._context.settings
        kvbm, mocker = settings.kvbm, settings.mocker
        if not kvbm.enabled:
            return
        per_block = layout.block_bytes
        tiers: list[CacheTier] = []
        if kvbm.host_cache_gb:
            blocks = max(1, int(kvbm.host_cache_gb * GIB) // per_block)
            tiers.append(SimTier("host", "CPU", blocks, gbps=mocker.host_tier_gbps))
        if kvbm.disk_cache_dir is not None:
            blocks = max(1, int(kvbm.disk_cache_gb * GIB) // per_block)
            latency = mocker.disk_tier_latency_ms / 1000
            tiers.append(
                SimTier("disk", "DISK", blocks, gbps=mocker.disk_tier_gbps, latency_s=latency)
            )
        if kvbm.remote_url:
            name = tier_names(settings)[-1]
            namespace = namespace_of(self._context.model.served_name, layout)
            tiers.append(
                SimTier(
                    name,
                    "REMOTE",
                    max(1, int(mocker.remote_tier_gb * GIB) // per_block),
                    gbps=mocker.remote_tier_gbps,
                    latency_s=mocker.remote_tier_latency_ms / 1000,
                    shared_key=(kvbm.remote_url, namespace),
                )
            )
        cache = TieredCache(
            tiers,
            parse_offload_policy(kvbm.offload_policy),
            block_size=self._block_size,
            max_pending_writes=kvbm.max_pending_writes,
        )
        self._block_bytes = per_block
        self._attach_tiers(cache, self._blocks)

    def _read_block(self, block_id: int) -> memoryview:
        return _NO_BYTES  # simulated KV has no bytes

    def _write_block(self, block_id: int, payload: memoryview) -> None:
        pass

    async def _onboard_delay(
        self, tiers: TieredCache, plan: OnboardPlan, first: int, landed: int
    ) -> None:
        seconds = 0.0
        local = tiers.chain.local[0] if tiers.chain.local else None
        for i in range(first, first + landed):
            j = i - plan.start
            name = plan.tiers[j] if 0 <= j < len(plan.tiers) else local
            tier = tiers.tier(name) if name is not None else None
            if isinstance(tier, SimTier):
                seconds += tier.onboard_seconds(1, self._block_bytes)
        if seconds > 0:
            await asyncio.sleep(seconds / self._context.settings.mocker.speedup)

    async def aclose(self) -> None:
        if not await self._stop_loop():
            return
        await self._close_agent()
        tiers, self._tiers = self._tiers, None
        if tiers is not None:
            tiers.close()
        self._blocks.clear()
        self._events.publish(self._blocks.drain_events())

    def _build_constraint_compiler(self) -> ConstraintCompiler:
        compiler = super()._build_constraint_compiler()
        token_classes(compiler)  # O(vocabulary): here in the thread, not on the loop
        return compiler

    def _make_request(self, request: EngineRequest, tokens: list[int], grammar: Any) -> _Request:
        assert self._words is not None
        sampling = request.sampling
        stream = self._words.stream(
            request.prompt_token_ids, temperature=sampling.temperature, seed=sampling.seed
        )
        picker: Picker | None = None
        if grammar is not None or sampling.logit_bias:
            matcher = classes = None
            compiler = self._constraint_compiler
            if grammar is not None and compiler is not None and sampling.constraint is not None:
                matcher = compiler.matcher(
                    grammar, after_token_ids=sampling.constraint.after_token_ids
                )
                classes = token_classes(compiler)
            picker = Picker(sampling, self._words, matcher=matcher, classes=classes)
        # Tokens generated elsewhere (a prefill worker, a lost worker) were this
        # stream's first words: carry on after them, as one engine would have.
        if picker is None:
            for token in request.resumed_token_ids:
                stream.resume(token)
        else:
            for token in request.resumed_token_ids:
                picker.replay(stream, token)
            if picker.error is not None:
                raise EngineError(f"request {request.request_id!r}: resumed tokens: {picker.error}")
        return _Request(
            request.request_id,
            tokens,
            sampling.max_tokens - len(request.resumed_token_ids),
            stream,
            sampling.logprobs,
            picker,
        )

    # -- the step loop ----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._clock = loop.time()
        yielded_at = self._clock
        try:
            while True:
                plan = await self._next_plan()
                if plan is None:
                    self._clock = loop.time()  # idle time is not owed to anyone
                    continue
                now = loop.time()
                duration = self._timing.step_seconds(plan.prefill_tokens, plan.decode_blocks)
                self._clock = max(self._clock, now - _MAX_LAG_S) + duration
                ahead = self._clock - now
                if ahead >= _MIN_SLEEP_S:
                    await asyncio.sleep(ahead)
                    yielded_at = loop.time()
                elif ahead > 0 or now - yielded_at >= _MAX_BURST_S:
                    await asyncio.sleep(0)
                    yielded_at = loop.time()
                # else: this step's simulated end is already past. A real engine runs
                # beside the frontend, not on its event loop, so it would have
                # finished the step meanwhile: complete it without yielding, and a
                # busy consumer finds several tokens waiting (as it would behind a
                # separate engine process) instead of slowing the engine down.
                self._complete(plan)
                self._num_steps += 1
                self._publish_step_events()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(exc)

    def _complete(self, plan: StepPlan) -> None:
        """Draw a word for every sampling request and apply the step."""
        sampled: list[int] = []
        append = sampled.append
        stops: list[FinishReason | None] | None = None  # only when a grammar ends
        # Every Seq this engine schedules is a _Request (a cast, not a check per token).
        for req in cast("list[_Request]", plan.sampling):
            if req.status is not _RUNNING:
                append(0)  # aborted while the step ran: complete() drops it
                continue
            picker = req.picker
            if picker is not None:
                token, logprob, ends = picker.next(req.stream, req.top_k)
                append(token)
                if req.logprobs is not None and logprob is not None:
                    req.logprobs.append(logprob)
                if ends:  # the grammar is done (a picker only picks what it allows)
                    if stops is None:
                        stops = [None] * len(plan.sampling)
                    stops[len(sampled) - 1] = FinishReason.STOP
            elif req.top_k is None:
                append(req.stream.next())
            else:
                token, logprob = req.stream.next_with_logprob(req.top_k)
                append(token)
                assert req.logprobs is not None
                req.logprobs.append(logprob)
            # Waking only schedules the consumer; it runs after complete() below has
            # appended the token, so one pass serves both.
            if req.waiter is not None:
                req.wake()
        self.scheduler.complete(plan, sampled, stops)
