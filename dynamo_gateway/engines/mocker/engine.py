"""The mocker engine: continuous batching over a simulated KV cache, without a model.

It schedules like a real paged-attention engine (FIFO admission, chunked
prefill, one decode token per running sequence per step, preemption by
recompute), keeps a real prefix cache with real KV events, and sleeps for
each step as long as `TimingModel` says, divided by ``speedup``. Output is
readable words from the model's tokenizer (`text.py`). It exists for testing
and scale experiments: hundreds of engines can share one event loop.

Generation ends at ``max_tokens`` or at the context window (both
`FinishReason.LENGTH`); the mocker never emits EOS, so ``ignore_eos``,
``min_tokens`` and ``stop_token_ids`` are accepted and have nothing to do.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator

from dynamo_gateway.engines.base import EngineBase, EngineContext, EngineState
from dynamo_gateway.engines.mocker.text import TokenStream, WordSource, load_word_source
from dynamo_gateway.engines.mocker.timing import TimingModel
from dynamo_gateway.errors import EngineError
from dynamo_gateway.kv.block_manager import BlockManager, KvSequence
from dynamo_gateway.protocol.engine import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    LoadMetrics,
    TokenLogprob,
)
from dynamo_gateway.protocol.kv_events import KvEvent

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

_NOWHERE, _WAITING, _RUNNING = 0, 1, 2

# KV capacity when `cache.num_kv_blocks` is not set: room for a busy worker.
DEFAULT_KV_BLOCKS = 16384


class _Request:
    """One request's scheduling state and its output collector, in one object."""

    __slots__ = (
        "cached_tokens",
        "chunk",
        "error",
        "finish_reason",
        "first_sent",
        "kv",
        "num_computed",
        "out_logprobs",
        "out_tokens",
        "prefilling",
        "queue",
        "remaining",
        "request_id",
        "stream",
        "tokens",
        "top_k",
        "waiter",
    )

    def __init__(
        self,
        request_id: str,
        tokens: list[int],
        remaining: int,
        stream: TokenStream,
        top_k: int | None,
    ) -> None:
        self.request_id = request_id
        self.tokens = tokens  # prompt, resumed tokens, then generated tokens
        self.remaining = remaining  # tokens still to generate
        self.stream = stream
        self.top_k = top_k  # None: no logprobs
        self.kv = KvSequence()
        self.num_computed = 0  # tokens whose KV is in the (simulated) cache
        self.prefilling = True
        self.chunk = 0  # tokens computed for it by the step in flight
        self.queue = _NOWHERE
        self.cached_tokens = 0
        # The collector: what the step loop produced since the consumer last took it.
        self.out_tokens: list[int] = []
        self.out_logprobs: list[TokenLogprob] | None = [] if top_k is not None else None
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.first_sent = False
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take(self) -> EngineOutput:
        out = EngineOutput(token_ids=self.out_tokens, finish_reason=self.finish_reason)
        self.out_tokens = []
        if self.out_logprobs is not None:
            out.logprobs = self.out_logprobs
            self.out_logprobs = []
        if not self.first_sent:
            self.first_sent = True
            out.cached_tokens = self.cached_tokens
        if self.error is not None:
            out.error = self.error
        return out


class MockerEngine(EngineBase):
    """A simulated engine for one worker; `MockerEngine(context)` is an `EngineFactory`."""

    def __init__(self, context: EngineContext) -> None:
        cfg = context.settings.mocker
        self._context = context
        self._worker_id = context.worker_id
        self._publish = context.publish_kv_event
        sched = context.settings.scheduler
        cache = context.settings.cache
        self._max_num_seqs = sched.max_num_seqs
        self._max_batched_tokens = sched.max_num_batched_tokens
        self._max_len = context.model.max_model_len
        self._timing = TimingModel.from_settings(cfg)
        self._blocks = BlockManager(
            cache.num_kv_blocks or DEFAULT_KV_BLOCKS,
            cache.block_size,
            record_events=self._publish is not None,
        )
        self._state = EngineState.CREATED
        self._words: WordSource | None = None
        self._requests: dict[str, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # in admission order
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: BaseException | None = None
        self._event_id = 0
        self._num_preemptions = 0
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
    def num_preemptions(self) -> int:
        """Requests sent back to the waiting queue so far (for tests and stats)."""
        return self._num_preemptions

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
                if not req.out_tokens and req.finish_reason is None:
                    waiter: asyncio.Future[None] = loop.create_future()
                    req.waiter = waiter
                    await waiter
                out = req.take()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if req.finish_reason is None:  # the consumer went away
                self._finish(req, FinishReason.ABORT)

    async def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self._finish(req, FinishReason.ABORT)

    async def check_health(self) -> None:
        if self._state is EngineState.FAILED:
            raise EngineError(f"mocker engine {self._worker_id} failed: {self._failure!r}")
        if self._state is not EngineState.RUNNING:
            raise EngineError(f"mocker engine {self._worker_id} is {self._state.value}")
        if self._task is None or self._task.done():
            raise EngineError(f"mocker engine {self._worker_id}: step loop is not running")

    def load(self) -> LoadMetrics:
        return LoadMetrics(
            active_requests=len(self._running),
            waiting_requests=len(self._waiting),
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
        for req in list(self._requests.values()):
            self._finish(req, FinishReason.ABORT)
        self._blocks.clear()
        self._publish_events()

    # -- requests ---------------------------------------------------------------------

    def _submit(self, request: EngineRequest) -> _Request:
        if request.request_id in self._requests:
            raise EngineError(f"request {request.request_id!r} is already running")
        assert self._words is not None
        sampling = request.sampling
        tokens = list(request.prompt_token_ids)
        tokens.extend(request.resumed_token_ids)
        if not tokens:
            raise EngineError(f"request {request.request_id!r} has an empty prompt")
        remaining = min(
            sampling.max_tokens - len(request.resumed_token_ids), self._max_len - len(tokens)
        )
        stream = self._words.stream(
            request.prompt_token_ids, temperature=sampling.temperature, seed=sampling.seed
        )
        req = _Request(request.request_id, tokens, remaining, stream, sampling.logprobs)
        if remaining <= 0:
            req.finish_reason = FinishReason.LENGTH
            return req
        needed = self._blocks.blocks_for(len(tokens))
        if needed > self._blocks.num_blocks:
            req.finish_reason = FinishReason.ERROR
            req.error = f"prompt needs {needed} KV blocks, the mocker has {self._blocks.num_blocks}"
            return req
        self._requests[req.request_id] = req
        req.queue = _WAITING
        self._waiting.append(req)
        self._wake.set()
        return req

    def _finish(self, req: _Request, reason: FinishReason, error: str | None = None) -> None:
        """End a request wherever it is; its blocks go back to the pool."""
        if req.finish_reason is not None:
            return
        if req.queue == _RUNNING:
            self._running.remove(req)
        elif req.queue == _WAITING:
            self._waiting.remove(req)
        req.queue = _NOWHERE
        self._blocks.free(req.kv)
        self._requests.pop(req.request_id, None)
        req.finish_reason = reason
        req.error = error
        req.wake()

    def _preempt(self, req: _Request) -> None:
        """Send a running request back to the head of the queue; it will recompute its KV."""
        self._blocks.free(req.kv)
        req.num_computed = 0
        req.prefilling = True
        req.queue = _WAITING
        self._waiting.appendleft(req)
        self._num_preemptions += 1

    # -- the step loop ----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._clock = loop.time()
        yielded_at = self._clock
        try:
            while True:
                if not self._running and not self._waiting:
                    self._wake.clear()
                    await self._wake.wait()
                    self._clock = loop.time()  # idle time is not owed to anyone
                    continue
                batch, prefill_tokens, decode_blocks = self._schedule()
                if not batch:
                    # Scheduling only finished or preempted requests (e.g. the last
                    # running one hit the KV capacity): the next pass admits.
                    await asyncio.sleep(0)
                    continue
                now = loop.time()
                duration = self._timing.step_seconds(prefill_tokens, decode_blocks)
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
                self._complete(batch)
                self._num_steps += 1
                self._publish_events()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("mocker engine %s: step loop failed", self._worker_id)
            self._failure = exc
            self._state = EngineState.FAILED
            for req in list(self._requests.values()):
                self._finish(req, FinishReason.ERROR, f"mocker step failed: {exc!r}")

    def _schedule(self) -> tuple[list[_Request], int, int]:
        """Pick this step's work: returns (batch, new prefill tokens, decode KV blocks).

        Algorithm: a token budget of ``max_num_batched_tokens`` is spent in three
        passes. (1) Every decoding request, oldest first, gets one token; if its
        next token needs a block and none is free, the most recently admitted
        running request is preempted (blocks freed, pushed to the front of the
        waiting queue) until the block fits; a request alone in a full cache
        finishes with LENGTH, since its context can never grow. (2) Requests still
        prefilling get chunks of their remaining prompt, in admission order.
        (3) Unless (1) preempted, the waiting queue is admitted strictly FIFO while
        budget, ``max_num_seqs`` and blocks allow (blocks for all known tokens, the
        cached prefix reused, one spare block kept while others run); the head
        never gets overtaken, so nobody starves, and the oldest running request
        always progresses, so preemption cannot livelock.
        """
        budget = self._max_batched_tokens
        blocks = self._blocks
        bs = blocks.block_size
        running = self._running
        batch: list[_Request] = []
        decode_blocks = 0
        prefill_tokens = 0
        preempted = False

        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            i += 1
            if req.prefilling:
                continue
            kv = req.kv
            if req.num_computed >= len(kv.block_ids) * bs and not blocks.append_slots(
                kv, req.num_computed + 1
            ):
                preempted = True
                if not self._make_room(req):
                    continue
            req.chunk = 1
            budget -= 1
            decode_blocks += len(kv.block_ids)
            batch.append(req)

        for req in running:
            if budget <= 0:
                break
            if req.prefilling:
                chunk = min(len(req.tokens) - req.num_computed, budget)
                req.chunk = chunk
                budget -= chunk
                prefill_tokens += chunk
                batch.append(req)

        waiting = self._waiting
        while not preempted and waiting and budget > 0 and len(running) < self._max_num_seqs:
            req = waiting[0]
            if not blocks.allocate(req.kv, req.tokens, reserve=1 if running else 0):
                if running:
                    break
                # An empty cache can't hold it: it never will (checked at submit too).
                self._finish(req, FinishReason.ERROR, "prompt does not fit the KV cache")
                continue
            waiting.popleft()
            req.queue = _RUNNING
            running.append(req)
            req.num_computed = req.kv.num_cached_tokens
            if not req.first_sent:
                req.cached_tokens = req.kv.num_cached_tokens
            chunk = min(len(req.tokens) - req.num_computed, budget)
            req.chunk = chunk
            budget -= chunk
            prefill_tokens += chunk
            batch.append(req)
        return batch, prefill_tokens, decode_blocks

    def _make_room(self, req: _Request) -> bool:
        """Preempt the newest running requests until `req` gets its next block."""
        running = self._running
        while True:
            if len(running) == 1:
                self._finish(req, FinishReason.LENGTH)
                return False
            victim = running.pop()
            self._preempt(victim)
            if victim is req:
                return False
            if self._blocks.append_slots(req.kv, req.num_computed + 1):
                return True

    def _complete(self, batch: list[_Request]) -> None:
        """Apply a finished step: advance the KV, sample one token per finished prefill/decode."""
        blocks = self._blocks
        bs = blocks.block_size
        max_len = self._max_len
        for req in batch:
            if req.queue != _RUNNING:
                continue  # aborted while the step ran
            req.num_computed += req.chunk
            tokens = req.tokens
            # Only a block that just filled up needs committing (cheap test per token).
            fills_block = req.num_computed >= (req.kv.num_registered + 1) * bs
            if req.num_computed < len(tokens):
                if fills_block:
                    blocks.commit(req.kv, tokens, req.num_computed)
                continue
            req.prefilling = False
            if req.top_k is None:
                token = req.stream.next()
            else:
                token, logprob = req.stream.next_with_logprob(req.top_k)
                assert req.out_logprobs is not None
                req.out_logprobs.append(logprob)
            tokens.append(token)
            req.out_tokens.append(token)
            req.remaining -= 1
            if fills_block:
                blocks.commit(req.kv, tokens, req.num_computed)
            if req.remaining <= 0 or len(tokens) >= max_len:
                self._finish(req, FinishReason.LENGTH)
            elif req.waiter is not None:
                req.wake()

    def _publish_events(self) -> None:
        events = self._blocks.drain_events()
        publish = self._publish
        if not events or publish is None:
            return
        for data in events:
            self._event_id += 1
            try:
                publish(KvEvent(worker_id=self._worker_id, event_id=self._event_id, data=data))
            except Exception:
                # A broken sink must not stop serving; consumers see the gap in ids.
                log.exception("mocker engine %s: publishing a KV event failed", self._worker_id)
