"""The asynchronous half shared by engines built on the pure `Scheduler`.

An engine built on the scheduler differs from another only in how it runs a
step (the mocker sleeps per its timing model, the reference engine runs a
model on a worker thread) and in what a request carries (a word stream, a
sampler). Everything else lives here: submitting requests, the coalescing
output stream each consumer reads, abort, health, load and stopping the step
loop. Subclasses implement `start()`, `_run()` (the step loop, which must call
`_fail()` if a step raises) and `_make_request()`.

KV snapshots (`kv_snapshot()`): the block pool is only ever changed on the event
loop (`schedule()`, `complete()`, `finish()`; the reference engine's worker
thread computes on copied inputs and never touches it), so a snapshot taken on
the loop sees a consistent pool. A step in flight may already have evicted
blocks (in `schedule()`) whose `BlockRemoved` the step loop publishes only after
the step; `kv_snapshot()` publishes such pending events first, so the snapshot's
``event_id`` is exactly the last published id and the snapshot reflects every
event up to it and none after.

KV tiers (`dynamo_gateway.kvbm`, when ``[kvbm]`` configures any and the engine
sets ``_tiers``): a new request's blocks past its device-cached prefix are
looked up in the tiers (on the tiers' reader thread) before it is queued; if a
tier holds some, the request is admitted RECEIVING, like a decode leg, and the
blocks are onboarded into its fresh device blocks while other requests keep
running (`_onboard`). What was onboarded counts as cached (``cached_tokens``);
what could not be is recomputed. Device blocks go down through the block pool's
``on_commit``/``on_evict`` hooks (`_offload_block`), and the tiers' events join
the worker's KV event stream on the loop.

Structured output and logit bias (`SamplingParams.constraint`, `logit_bias`): an
engine enforces them only if it says so (`supports_structured_output`,
`supports_logit_bias`); otherwise a request asking for them is refused with
`InvalidRequestError` (a 400) before it is queued, never served unconstrained.
`logit_bias` ids outside the vocabulary are refused the same way. A constraint is
compiled (`dynamo_gateway.engines.constraints`) in a thread when the request is
submitted, before it is queued, and `_make_request()` gets the compiled grammar;
an uncompilable one is a 400 naming the problem. Nothing is compiled per step.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from dynamo_gateway.disagg.agent import KvTransferAgent
from dynamo_gateway.disagg.layout import KvLayout
from dynamo_gateway.disagg.params import (
    PrefillDone,
    is_remote_prefill,
    parse_prefill_done,
    wants_remote_decode,
)
from dynamo_gateway.disagg.transport import KvMemory
from dynamo_gateway.engines.base import EngineBase, EngineContext, EngineState
from dynamo_gateway.engines.constraints import ConstraintCompiler, compiler_for, constraint_param
from dynamo_gateway.engines.scheduler import KvEventPublisher, Scheduler, Seq, StepPlan
from dynamo_gateway.errors import EngineError, InvalidRequestError, KvTransferError
from dynamo_gateway.kv.block_manager import BlockManager, KvSequence
from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.kvbm.manager import OnboardPlan, TieredCache
from dynamo_gateway.protocol.engine import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    LoadMetrics,
    WorkerRole,
)
from dynamo_gateway.protocol.kv_events import KvSnapshot

log = logging.getLogger(__name__)


class WaitingSeq(Seq):
    """A scheduler `Seq` whose consumer can wait for output (the request's collector)."""

    __slots__ = ("waiter",)

    def __init__(
        self, request_id: str, tokens: list[int], max_new_tokens: int, *, logprobs: bool
    ) -> None:
        super().__init__(request_id, tokens, max_new_tokens, logprobs=logprobs)
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


class ScheduledEngine(EngineBase):
    """Request plumbing of a scheduler-driven engine (see the module docstring)."""

    kind: ClassVar[str] = "engine"  # names the engine in messages: "mocker engine w0 ..."
    # Whether the engine enforces SamplingParams.constraint / logit_bias; if not, such
    # requests are refused (see the module docstring).
    supports_structured_output: ClassVar[bool] = False
    supports_logit_bias: ClassVar[bool] = False

    def __init__(self, context: EngineContext) -> None:
        self._context = context
        self._worker_id = context.worker_id
        self._block_size = context.settings.cache.block_size
        self._events = KvEventPublisher(context.worker_id, context.publish_kv_event)
        self._state = EngineState.CREATED
        self._sched: Scheduler | None = None  # set by start() (or __init__) of the subclass
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None
        self._num_steps = 0
        # Disaggregation (prefill and decode roles): set by the subclass's start().
        self._agent: KvTransferAgent | None = None
        self._pulls: set[asyncio.Task[None]] = set()
        self.local_fallbacks = 0  # decode legs that prefilled here instead of pulling
        # KV tiers below the device cache: set by the subclass's start() (`_attach_tiers`).
        self._tiers: TieredCache | None = None
        # Built on the first constrained request (it reads the tokenizer).
        self._constraint_compiler: ConstraintCompiler | None = None

    # -- introspection (tests, stats) -------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler (read it, don't change it); exists once started."""
        if self._sched is None:
            raise EngineError(self._describe())
        return self._sched

    @property
    def num_preemptions(self) -> int:
        """Requests sent back to the waiting queue so far."""
        return self._sched.num_preemptions if self._sched is not None else 0

    @property
    def num_steps(self) -> int:
        """Engine steps run so far."""
        return self._num_steps

    @property
    def kv_tiers(self) -> TieredCache | None:
        """This worker's KV tiers below the device cache, if any."""
        return self._tiers

    @property
    def kv_transfer_agent(self) -> KvTransferAgent | None:
        """This worker's disaggregation agent (prefill and decode roles), if any."""
        return self._agent

    def _describe(self) -> str:
        return f"{self.kind} engine {self._worker_id} is {self._state.value}"

    # -- the Engine protocol ----------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self._state is not EngineState.RUNNING or self._loop is None:
            raise EngineError(self._describe())
        grammar = await self._prepare(request)
        if self._state is not EngineState.RUNNING:  # stopped while compiling
            raise EngineError(self._describe())
        tiers = self._tiers
        req = self._submit(request, enqueue=tiers is None, grammar=grammar)
        loop = self._loop
        try:
            if tiers is not None:
                await self._plan_onboard(tiers, req)
                self._enqueue(req)
            while True:
                if not req.has_output:
                    waiter: asyncio.Future[None] = loop.create_future()
                    req.waiter = waiter
                    await waiter
                out = req.take_output()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if req.finish_reason is None and self._sched is not None:  # the consumer left
                self._sched.finish(req, FinishReason.ABORT)

    async def abort(self, request_id: str) -> None:
        if self._sched is None:
            return
        seq = self._sched.abort(request_id)
        if isinstance(seq, WaitingSeq):
            seq.wake()

    async def check_health(self) -> None:
        if self._state is EngineState.FAILED:
            raise EngineError(f"{self.kind} engine {self._worker_id} failed: {self._failure!r}")
        if self._state is not EngineState.RUNNING:
            raise EngineError(self._describe())
        if self._task is None or self._task.done():
            raise EngineError(f"{self.kind} engine {self._worker_id}: step loop is not running")

    def load(self) -> LoadMetrics:
        sched = self._sched
        if sched is None:
            return LoadMetrics()
        blocks = sched.block_manager
        return LoadMetrics(
            active_requests=sched.num_running,
            waiting_requests=sched.num_waiting,
            kv_blocks_used=blocks.num_used,
            kv_blocks_total=blocks.num_blocks,
        )

    # -- KV snapshots (optional, see `dynamo_gateway.engines.base`) --------------------

    @property
    def last_kv_event_id(self) -> int:
        """The id of the last KV event published (0: none yet)."""
        return self._events.last_event_id

    def kv_snapshot(self) -> KvSnapshot:
        """Every block in the prefix cache now, as of the last published KV event.

        Synchronous and O(cached blocks). Call it on the engine's event loop; it
        may publish KV events that were pending (see the module docstring).
        Raises `EngineError` before the engine started, when it publishes no KV
        events (no sink: the pool records nothing to dump), or off the loop.
        """
        sched = self._sched
        if sched is None:
            raise EngineError(self._describe())
        if not self._events.enabled:
            raise EngineError(
                f"{self.kind} engine {self._worker_id} publishes no KV events: nothing to snapshot"
            )
        loop = self._loop
        if loop is not None and self._state is EngineState.RUNNING:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not loop:
                raise EngineError(
                    f"{self.kind} engine {self._worker_id}: call kv_snapshot() on its event loop"
                )
        snapshot = self._events.snapshot(sched.block_manager)
        tiers = self._tiers
        if tiers is not None:
            # Tier events still queued are published first (the snapshot then
            # reflects them); a write landing meanwhile only repeats a store.
            self._publish_tier_events()
            snapshot = KvSnapshot(
                worker_id=snapshot.worker_id,
                event_id=self._events.last_event_id,
                blocks=[*snapshot.blocks, *tiers.snapshot()],
            )
        return snapshot

    # -- for subclasses ---------------------------------------------------------------

    def _make_request(self, request: EngineRequest, tokens: list[int], grammar: Any) -> WaitingSeq:
        """Build the engine's own request object; `tokens` = prompt + resumed tokens;
        `grammar`: the compiled `sampling.constraint` (None without one)."""
        raise NotImplementedError

    def _logits_vocab_size(self) -> int:
        """Token ids the engine can produce (its logits' width); 0: unknown."""
        return self._context.model.vocab_size

    async def _prepare(self, request: EngineRequest) -> Any:
        """Check `logit_bias` and compile the constraint: the compiled grammar or None.

        Raises `InvalidRequestError` for what the engine cannot honour. Returns without
        yielding to the loop when there is nothing to compile (the common case) or the
        grammar is cached.
        """
        sampling = request.sampling
        if sampling.logit_bias:
            self._check_logit_bias(request)
        constraint = sampling.constraint
        if constraint is None:
            return None
        if not self.supports_structured_output:
            raise InvalidRequestError(
                f"the {self.kind} engine does not support structured output "
                f"({constraint.kind} constraint)",
                param=constraint_param(constraint.kind),
            )
        compiler = self._constraint_compiler
        if compiler is None:
            compiler = await asyncio.to_thread(self._build_constraint_compiler)
            self._constraint_compiler = compiler
        grammar = compiler.cached(constraint)
        if grammar is None:
            grammar = await asyncio.to_thread(compiler.compile, constraint)
        return grammar

    def _build_constraint_compiler(self) -> ConstraintCompiler:
        """Runs in a thread: the model's `ConstraintCompiler` (shared per process)."""
        model = self._context.model
        return compiler_for(
            model.path,
            vocab_size=self._logits_vocab_size(),
            stop_token_ids=model.eos_token_ids,
        )

    def _check_logit_bias(self, request: EngineRequest) -> None:
        if not self.supports_logit_bias:
            raise InvalidRequestError(
                f"the {self.kind} engine does not support logit_bias", param="logit_bias"
            )
        vocab = self._logits_vocab_size()
        for token_id, bias in request.sampling.logit_bias:
            if token_id < 0 or (vocab and token_id >= vocab):
                limit = f" (0..{vocab - 1})" if vocab else ""
                raise InvalidRequestError(
                    f"logit_bias names token id {token_id}, outside the vocabulary{limit}",
                    param="logit_bias",
                )
            if not math.isfinite(bias):
                raise InvalidRequestError(
                    f"logit_bias of token id {token_id} is not a finite number", param="logit_bias"
                )

    def _submit(
        self, request: EngineRequest, *, enqueue: bool = True, grammar: Any = None
    ) -> WaitingSeq:
        sched = self._sched
        assert sched is not None
        rid = request.request_id
        if sched.get(rid) is not None:
            raise EngineError(f"request {rid!r} is already running")
        tokens = list(request.prompt_token_ids)
        tokens.extend(request.resumed_token_ids)
        if not tokens:
            raise EngineError(f"request {rid!r} has an empty prompt")
        req = self._make_request(request, tokens, grammar)
        if request.kv_transfer_params:
            self._take_transfer_params(request, req)
        if enqueue:
            self._enqueue(req)
        return req

    def _enqueue(self, req: WaitingSeq) -> None:
        # False: it ended at once (nothing to generate, or too big for the cache);
        # the consumer finds the finish reason without waiting.
        assert self._sched is not None
        if self._sched.get(req.seq_id) is not None:
            raise EngineError(f"request {req.seq_id!r} is already running")
        if self._sched.add(req):
            self._wake.set()

    # -- disaggregation ----------------------------------------------------------------

    def _new_agent(
        self, layout: KvLayout, *, simulated_gbps: float | None = None
    ) -> KvTransferAgent | None:
        """This worker's transfer agent if its role is prefill or decode, else None."""
        if self._context.role is WorkerRole.AGGREGATED:
            return None
        registry = self._context.registry
        if registry is None:
            from dynamo_gateway.plugins import load_plugins

            settings = self._context.settings
            registry = load_plugins(only=settings.plugins).registry
        return KvTransferAgent(
            self._context.settings,
            registry,
            self._worker_id,
            layout,
            simulated_gbps=simulated_gbps,
        )

    async def _start_agent(self, agent: KvTransferAgent, memory: KvMemory | None) -> None:
        """Subclasses with a prefill or decode role call this from start()."""
        await agent.start(memory)
        self._agent = agent
        assert self._sched is not None
        self._sched.on_export = self._export
        self._sched.on_import_dropped = self._import_dropped

    async def _close_agent(self) -> None:
        for task in list(self._pulls):
            task.cancel()
        agent, self._agent = self._agent, None
        if agent is not None:
            await agent.aclose()

    def _take_transfer_params(self, request: EngineRequest, req: WaitingSeq) -> None:
        params = request.kv_transfer_params
        rid = request.request_id
        if wants_remote_decode(params):
            if self._agent is None:
                raise EngineError(
                    f"{self.kind} engine {self._worker_id} has no prefill role: "
                    f"cannot keep KV for a remote decode of {rid!r}"
                )
            req.export = True
            return
        if not is_remote_prefill(params):
            return
        agent = self._agent
        why: str | None
        if agent is None:
            why = f"worker {self._worker_id} has no decode role"
            done = None
        else:
            try:
                done = parse_prefill_done(params)
            except ValueError as exc:
                done, why = None, str(exc)
            else:
                why = agent.check(done)
        if why is not None or done is None or agent is None:
            self.local_fallbacks += 1
            log.warning("request %s: prefilling locally, not pulling KV: %s", rid, why)
            if done is not None and agent is not None:
                agent.stats.refused_pulls += 1
                agent.release_later(done)
            return
        # At least the last known token is computed here (it samples the next one).
        req.import_tokens = min(done.num_tokens, len(req.tokens) - 1)
        req.import_params = done

    def _export(self, seq: Seq, pinned: KvSequence) -> None:
        agent = self._agent
        sched = self._sched
        assert agent is not None and sched is not None

        def release() -> None:
            sched.block_manager.free(pinned)
            self._wake.set()  # a request may be waiting for these blocks

        seq.transfer_params = agent.export(pinned.block_ids, seq.num_computed, release)

    def _import_dropped(self, seq: Seq) -> None:
        """A decode leg ended before pulling: let the prefill worker free its blocks now."""
        if self._agent is not None and isinstance(seq.import_params, PrefillDone):
            self._agent.release_later(seq.import_params)
        seq.import_params = None  # (an `OnboardPlan` holds nothing to release)

    def _start_pulls(self, plan: StepPlan) -> None:
        for seq in plan.imports:
            if isinstance(seq.import_params, OnboardPlan):
                work = self._onboard(seq)
            else:
                work = self._pull(seq)
            task = asyncio.get_running_loop().create_task(work)
            self._pulls.add(task)
            task.add_done_callback(self._pulls.discard)

    async def _pull(self, seq: Seq) -> None:
        agent = self._agent
        done: PrefillDone = seq.import_params
        seq.import_params = None
        ok = False
        try:
            if agent is None:
                raise KvTransferError("the engine is stopping")
            bs = self._block_size
            first = seq.num_computed // bs  # leading blocks cached here already
            end = -(-seq.import_tokens // bs)
            src = done.remote_block_ids[first:end]
            if len(src) < end - first:
                raise KvTransferError(
                    f"{len(done.remote_block_ids)} blocks sent for {seq.import_tokens} tokens"
                )
            if src:
                await agent.pull(done, src, seq.kv.block_ids[first:end])
            else:
                agent.release_later(done)  # everything was cached here
            ok = True
        except KvTransferError as exc:
            self.local_fallbacks += 1
            log.warning("request %s: prefilling locally: %s", seq.seq_id, exc)
        finally:
            if self._sched is not None:
                self._sched.import_done(seq, ok)
                if seq.finish_reason is not None and isinstance(seq, WaitingSeq):
                    seq.wake()
            self._wake.set()

    # -- KV tiers -----------------------------------------------------------------------

    def _attach_tiers(self, tiers: TieredCache, blocks: BlockManager) -> None:
        """Subclasses with tiers call this from start(), before the step loop runs."""
        loop = asyncio.get_running_loop()
        self._tiers = tiers

        def notify() -> None:  # from any thread
            loop.call_soon_threadsafe(self._publish_tier_events)

        tiers.notify = notify
        blocks.on_commit = lambda bid, h: self._offload_block(blocks, bid, h, evicted=False)
        blocks.on_evict = lambda bid, h: self._offload_block(blocks, bid, h, evicted=True)

    def _offload_block(self, blocks: BlockManager, bid: int, h: int, *, evicted: bool) -> None:
        tiers = self._tiers
        if tiers is None:
            return
        targets = tiers.device_targets(h, evicted=evicted)
        if targets:
            stored = blocks.stored(h)
            meta = (stored[0], stored[1]) if stored is not None else (None, ())
            tiers.offload(h, meta, self._read_block(bid), targets)

    def _read_block(self, block_id: int) -> memoryview:
        """A private copy of one device block's bytes (engines with tiers implement it)."""
        raise NotImplementedError

    def _write_block(self, block_id: int, payload: memoryview) -> None:
        """Write one block's bytes into a device block (runs on the tiers' reader thread)."""
        raise NotImplementedError

    async def _onboard_delay(
        self, tiers: TieredCache, plan: OnboardPlan, first: int, landed: int
    ) -> None:
        """Engines that simulate time (the mocker) wait here for the blocks to arrive."""

    def _publish_step_events(self) -> None:
        """After a step: the block pool's KV events, then the tiers' (same worker ids)."""
        if self._sched is not None:
            self._events.publish(self._sched.drain_events())
        self._publish_tier_events()

    def _publish_tier_events(self) -> None:
        tiers = self._tiers
        if tiers is not None and self._sched is not None:
            self._events.publish(tiers.drain_events())

    async def _plan_onboard(self, tiers: TieredCache, req: WaitingSeq) -> None:
        """Before a request is queued: do the tiers hold blocks past its device prefix?"""
        sched = self._sched
        if req.import_tokens or sched is None:
            return  # a decode leg: its KV comes from the prefill worker
        bs = self._block_size
        tokens = req.tokens
        limit = (len(tokens) - 1) // bs  # at least one token is computed (its logits)
        if limit <= 0:
            return
        hashes = sequence_hashes(tokens[: limit * bs], bs)
        req.kv.hashes = list(hashes)  # the pool would compute the same ones
        tiers.record_uses(hashes)
        start = sched.block_manager.cached_run(hashes)
        if start >= limit:
            return
        loop = asyncio.get_running_loop()
        plan = await loop.run_in_executor(tiers.reader, tiers.lookup, hashes, start)
        if plan is not None:
            req.import_tokens = plan.end * bs
            req.import_params = plan

    async def _onboard(self, seq: Seq) -> None:
        """A RECEIVING request's blocks come up from the tiers; the rest is recomputed."""
        tiers = self._tiers
        plan: OnboardPlan = seq.import_params
        seq.import_params = None
        bs = self._block_size
        first = seq.num_computed // bs  # leading blocks the device holds now
        end = seq.import_tokens // bs
        landed = 0
        try:
            if tiers is not None and first < end:
                block_ids = list(seq.kv.block_ids)

                def write(i: int, payload: memoryview) -> None:
                    self._write_block(block_ids[i], payload)

                loop = asyncio.get_running_loop()
                landed = await loop.run_in_executor(
                    tiers.reader, tiers.onboard, plan, first, end, write
                )
                await self._onboard_delay(tiers, plan, first, landed)
        except Exception:
            log.exception("request %s: onboarding KV blocks failed; recomputing", seq.seq_id)
            landed = 0
        finally:
            seq.import_tokens = min(seq.import_tokens, (first + landed) * bs)
            if self._sched is not None:
                self._sched.import_done(seq, True)
                if not seq.first_sent and seq.finish_reason is None:
                    seq.cached_tokens = seq.num_computed
                if seq.finish_reason is not None and isinstance(seq, WaitingSeq):
                    seq.wake()
            self._wake.set()

    def _start_loop(self) -> None:
        """Start the step loop; the engine is RUNNING from here on."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name=f"{self.kind}-{self._worker_id}")
        self._state = EngineState.RUNNING

    async def _run(self) -> None:
        raise NotImplementedError

    async def _next_plan(self) -> StepPlan | None:
        """Wait for work and schedule a step; None if the step loop should come back.

        None after an idle wait (the engine may reset its clocks) or when the
        pass only finished or preempted sequences (the next pass admits).
        """
        sched = self.scheduler
        if not sched.has_work:
            self._wake.clear()
            await self._wake.wait()
            return None
        plan = sched.schedule()
        if plan.imports:
            self._start_pulls(plan)
        for seq in plan.finished:
            if isinstance(seq, WaitingSeq):
                seq.wake()
        if not plan.seqs:
            if sched.num_receiving:
                # Nothing runs until a transfer lands (it sets the event).
                self._wake.clear()
                await self._wake.wait()
            else:
                await asyncio.sleep(0)
            return None
        return plan

    def _fail(self, exc: BaseException) -> None:
        """A step raised: every request ends with ERROR and the engine is FAILED."""
        log.exception("%s engine %s: step failed", self.kind, self._worker_id, exc_info=exc)
        self._failure = exc
        self._state = EngineState.FAILED
        self._end_all(FinishReason.ERROR, f"{self.kind} engine step failed: {exc!r}")

    def _end_all(self, reason: FinishReason, error: str | None = None) -> None:
        if self._sched is None:
            return
        for seq in self._sched.finish_all(reason, error):
            if isinstance(seq, WaitingSeq):
                seq.wake()

    async def _stop_loop(self) -> bool:
        """Mark the engine STOPPED and cancel the step loop; False if it already was."""
        if self._state is EngineState.STOPPED:
            return False
        self._state = EngineState.STOPPED
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        self._end_all(FinishReason.ABORT)
        return True
