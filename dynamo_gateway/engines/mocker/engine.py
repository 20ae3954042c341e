"""The mocker engine: continuous batching over a simulated KV cache, without a model.

It schedules like a real paged-attention engine, with the same `Scheduler`
as the reference engine (FIFO admission, chunked prefill, one decode token per
running sequence per step, preemption by recompute), keeps a real prefix cache
with real KV events, and sleeps for each step as long as `TimingModel` says,
divided by ``speedup``. Output is
readable words from the model's tokenizer (`text.py`). It exists for testing
and scale experiments: hundreds of engines can share one event loop.

Generation ends at ``max_tokens`` or at the context window (both
`FinishReason.LENGTH`); the mocker never emits EOS, so ``ignore_eos``,
``min_tokens`` and ``stop_token_ids`` are accepted and have nothing to do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import cast

from dynamo_gateway.engines.base import EngineBase, EngineContext, EngineState
from dynamo_gateway.engines.mocker.text import TokenStream, WordSource, load_word_source
from dynamo_gateway.engines.mocker.timing import TimingModel
from dynamo_gateway.engines.scheduler import KvEventPublisher, Scheduler, Seq, SeqStatus, StepPlan
from dynamo_gateway.errors import EngineError
from dynamo_gateway.kv.block_manager import BlockManager
from dynamo_gateway.protocol.engine import EngineOutput, EngineRequest, FinishReason, LoadMetrics

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


class _Request(Seq):
    """One request: the scheduler's `Seq` plus its word stream and consumer wake-up."""

    __slots__ = ("stream", "top_k", "waiter")

    def __init__(
        self,
        request_id: str,
        tokens: list[int],
        remaining: int,
        stream: TokenStream,
        top_k: int | None,
    ) -> None:
        super().__init__(request_id, tokens, remaining, logprobs=top_k is not None)
        self.stream = stream
        self.top_k = top_k  # None: no logprobs
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


class MockerEngine(EngineBase):
    """A simulated engine for one worker; `MockerEngine(context)` is an `EngineFactory`."""

    def __init__(self, context: EngineContext) -> None:
        cfg = context.settings.mocker
        self._context = context
        self._worker_id = context.worker_id
        sched = context.settings.scheduler
        cache = context.settings.cache
        self._timing = TimingModel.from_settings(cfg)
        self._events = KvEventPublisher(context.worker_id, context.publish_kv_event)
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
        self._state = EngineState.CREATED
        self._words: WordSource | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None
        self._num_steps = 0
        self._clock = 0.0  # loop time at which the simulated step in flight ends

    # -- Engine protocol --------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def block_size(self) -> int:
        return self._blocks.block_size

    @property
    def block_manager(self) -> BlockManager:
        """The simulated KV cache (read it, don't change it)."""
        return self._blocks

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler (read it, don't change it)."""
        return self._sched

    @property
    def num_preemptions(self) -> int:
        """Requests sent back to the waiting queue so far (for tests and stats)."""
        return self._sched.num_preemptions

    @property
    def num_steps(self) -> int:
        """Engine steps simulated so far (for tests and stats)."""
        return self._num_steps

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
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name=f"mocker-step-{self._worker_id}")
        self._state = EngineState.RUNNING

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self._state is not EngineState.RUNNING or self._loop is None:
            raise EngineError(f"mocker engine {self._worker_id} is {self._state.value}")
        req = self._submit(request)
        loop = self._loop
        try:
            while True:
                if len(req.tokens) == req.sent and req.finish_reason is None:  # nothing new
                    waiter: asyncio.Future[None] = loop.create_future()
                    req.waiter = waiter
                    await waiter
                out = req.take_output()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if req.finish_reason is None:  # the consumer went away
                self._sched.finish(req, FinishReason.ABORT)

    async def abort(self, request_id: str) -> None:
        seq = self._sched.abort(request_id)
        if isinstance(seq, _Request):
            seq.wake()

    async def check_health(self) -> None:
        if self._state is EngineState.FAILED:
            raise EngineError(f"mocker engine {self._worker_id} failed: {self._failure!r}")
        if self._state is not EngineState.RUNNING:
            raise EngineError(f"mocker engine {self._worker_id} is {self._state.value}")
        if self._task is None or self._task.done():
            raise EngineError(f"mocker engine {self._worker_id}: step loop is not running")

    def load(self) -> LoadMetrics:
        return LoadMetrics(
            active_requests=self._sched.num_running,
            waiting_requests=self._sched.num_waiting,
            kv_blocks_used=self._blocks.num_used,
            kv_blocks_total=self._blocks.num_blocks,
        )

    async def aclose(self) -> None:
        if self._state is EngineState.STOPPED:
            return
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
        self._blocks.clear()
        self._events.publish(self._sched.drain_events())

    # -- requests ---------------------------------------------------------------------

    def _submit(self, request: EngineRequest) -> _Request:
        if self._sched.get(request.request_id) is not None:
            raise EngineError(f"request {request.request_id!r} is already running")
        assert self._words is not None
        sampling = request.sampling
        tokens = list(request.prompt_token_ids)
        tokens.extend(request.resumed_token_ids)
        if not tokens:
            raise EngineError(f"request {request.request_id!r} has an empty prompt")
        stream = self._words.stream(
            request.prompt_token_ids, temperature=sampling.temperature, seed=sampling.seed
        )
        req = _Request(
            request.request_id,
            tokens,
            sampling.max_tokens - len(request.resumed_token_ids),
            stream,
            sampling.logprobs,
        )
        # False: it ended at once (nothing to generate, or too big); the consumer
        # finds the finish reason without waiting.
        if self._sched.add(req):
            self._wake.set()
        return req

    def _end_all(self, reason: FinishReason, error: str | None = None) -> None:
        for seq in self._sched.finish_all(reason, error):
            if isinstance(seq, _Request):
                seq.wake()

    # -- the step loop ----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        sched = self._sched
        self._clock = loop.time()
        yielded_at = self._clock
        try:
            while True:
                if not sched.has_work:
                    self._wake.clear()
                    await self._wake.wait()
                    self._clock = loop.time()  # idle time is not owed to anyone
                    continue
                plan = sched.schedule()
                for req in cast("list[_Request]", plan.finished):
                    req.wake()
                if not plan.seqs:
                    # Scheduling only finished or preempted requests: the next pass admits.
                    await asyncio.sleep(0)
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
                self._events.publish(sched.drain_events())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("mocker engine %s: step loop failed", self._worker_id)
            self._failure = exc
            self._state = EngineState.FAILED
            self._end_all(FinishReason.ERROR, f"mocker step failed: {exc!r}")

    def _complete(self, plan: StepPlan) -> None:
        """Draw a word for every sampling request and apply the step."""
        sampled: list[int] = []
        append = sampled.append
        # Every Seq this engine schedules is a _Request (a cast, not a check per token).
        for req in cast("list[_Request]", plan.sampling):
            if req.status is not _RUNNING:
                append(0)  # aborted while the step ran: complete() drops it
                continue
            if req.top_k is None:
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
        self._sched.complete(plan, sampled)
