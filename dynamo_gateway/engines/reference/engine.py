"""The torch reference engine: a real model behind the shared continuous-batching scheduler.

One worker = one `ReferenceModel`, one `PagedKVCache` whose block rows are the
`BlockManager`'s block ids, the shared `Scheduler` (FIFO admission, chunked
prefill, preemption by recompute, prefix caching) and a `Sampler`.

Threading: the model never runs on the event loop. A step loop (an asyncio
task) calls ``scheduler.schedule()`` on the loop, copies the step's inputs out
of the scheduler's state, and hands them to ONE dedicated worker thread (a
single-thread executor, so steps never overlap and torch state stays on one
thread), which builds the `ForwardBatch`, runs the forward pass and samples.
Back on the loop it records the tokens, applies stop rules, calls
``scheduler.complete()``, wakes the consumers and publishes KV events. While a
step runs, the loop stays free: consumers read, the frontend serves, and
`abort()` takes effect at once (the blocks are freed; the request's results
from the step in flight are dropped by ``complete()``). Nothing allocates
blocks until the step is done, so the thread never writes KV into a block
that someone else already owns.

Generation ends with STOP at EOS or a stop token id (after ``min_tokens``,
unless ``ignore_eos``), and with LENGTH at ``max_tokens`` (resumed tokens
count) or the context window. A step that raises fails every request with
ERROR and leaves the engine FAILED.

Structured output and ``logit_bias`` are enforced in the sampler
(`sampling.py`): the grammar is compiled when the request is submitted
(`ScheduledEngine`), its matcher masks the request's logits every step and is fed
each recorded token (on the loop, in `_apply`); the request ends with STOP right
after the token that completes the grammar (`dynamo_gateway.engines.constraints`).
A step with constrained requests may fill their bitmask on a second thread while the
worker thread runs the forward pass (xgrammar releases the GIL), so that the mask
costs the step only its application to the logits (`GRAMMAR_ASIDE` says when).
No matcher is fed while its mask is being filled: both happen between two `_apply`
calls of the loop.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numpy as np
import torch

from dynamo_gateway.disagg.layout import KvLayout
from dynamo_gateway.disagg.transport import KvMemory
from dynamo_gateway.engines.base import EngineContext, EngineState
from dynamo_gateway.engines.reference.batch import ForwardBatch, SeqInput
from dynamo_gateway.engines.reference.kv_cache import PagedKVCache, auto_num_blocks
from dynamo_gateway.engines.reference.model import ReferenceModel
from dynamo_gateway.engines.reference.sampling import GrammarMask, Sampler, SequenceSampler
from dynamo_gateway.engines.scheduled import ScheduledEngine, WaitingSeq
from dynamo_gateway.engines.scheduler import Scheduler, SeqStatus, StepPlan
from dynamo_gateway.errors import ConfigError, EngineError
from dynamo_gateway.kv.block_manager import BlockManager
from dynamo_gateway.kvbm.build import build_tiered_cache
from dynamo_gateway.protocol.engine import (
    EngineRequest,
    FinishReason,
    TokenLogprob,
    WorkerRole,
)

__all__ = ["ReferenceEngine"]

log = logging.getLogger(__name__)

_RUNNING = SeqStatus.RUNNING

StepResult = list[tuple[int, TokenLogprob | None]]

#: Where a step's grammar bitmask is filled. True: on a second thread while the forward
#: pass runs (xgrammar releases the GIL); False: in the sampler, after it; None: aside
#: when the model is on an accelerator (the host idles during its forward pass), in the
#: sampler on the CPU, where the forward's own threads hold the cores and a thread hop
#: costs more than the fill (on a 2-core host, SmolLM2-135M at batch 32: 1% slower
#: than free decoding filled in the sampler, 18% filled aside).
GRAMMAR_ASIDE: bool | None = None


class _Request(WaitingSeq):
    """One request: the scheduler's `Seq` plus its sampling state.

    The `SequenceSampler` lives as long as the request, preemptions included, so
    a recomputed request samples exactly as it would have without preemption.
    """

    __slots__ = ("sampler",)

    def __init__(
        self,
        request_id: str,
        tokens: list[int],
        max_new_tokens: int,
        sampler: SequenceSampler,
        *,
        logprobs: bool,
    ) -> None:
        super().__init__(request_id, tokens, max_new_tokens, logprobs=logprobs)
        self.sampler = sampler


@dataclass
class _Runtime:
    """What `start()` builds in the worker thread: the model and everything sized by it."""

    model: ReferenceModel
    cache: PagedKVCache
    blocks: BlockManager
    sampler: Sampler


def _layout_of(model: ReferenceModel, block_size: int) -> KvLayout:
    config = model.config
    return KvLayout(
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        block_size=block_size,
        dtype=str(model.dtype).removeprefix("torch."),
    )


class ReferenceEngine(ScheduledEngine):
    """The torch engine for one worker; `ReferenceEngine(context)` is an `EngineFactory`."""

    kind = "reference"
    supports_structured_output: ClassVar[bool] = True
    supports_logit_bias: ClassVar[bool] = True

    def __init__(self, context: EngineContext) -> None:
        super().__init__(context)
        self._rt: _Runtime | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Fills grammar bitmasks during forward passes; started by the first one.
        self._grammar_executor: ThreadPoolExecutor | None = None
        self._vocab_size = 0

    @property
    def model(self) -> ReferenceModel:
        if self._rt is None:
            raise EngineError(f"reference engine {self._worker_id} is {self._state.value}")
        return self._rt.model

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        if self._state is EngineState.RUNNING:
            return
        if self._state is not EngineState.CREATED:
            raise EngineError(
                f"reference engine {self._worker_id} cannot start: {self._state.value}"
            )
        self._state = EngineState.STARTING
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ref-{self._worker_id}")
        self._executor = executor
        try:
            # Loading reads and converts every weight: seconds for a real model.
            model, num_blocks = await loop.run_in_executor(executor, self._load_model)
            agent = self._new_agent(_layout_of(model, self._block_size))
            memory = agent.allocate(num_blocks) if agent is not None else None
            rt = await loop.run_in_executor(executor, self._build, model, num_blocks, memory)
        except BaseException as exc:
            if self._state is EngineState.STARTING:
                self._state = EngineState.FAILED
                self._failure = exc
            executor.shutdown(wait=False)
            raise
        if self._state is not EngineState.STARTING:  # aclose() ran meanwhile
            executor.shutdown(wait=False)
            raise EngineError(f"reference engine {self._worker_id} closed while starting")
        self._rt = rt
        self._vocab_size = rt.model.config.vocab_size
        max_len = self._context.model.max_model_len
        max_pos = rt.model.config.max_position_embeddings
        if max_len > max_pos:
            # The model has no rotary table past this; a longer context would fail a step.
            log.warning(
                "reference engine %s: max_model_len %d exceeds the model's %d positions; using %d",
                self._worker_id,
                max_len,
                max_pos,
                max_pos,
            )
            max_len = max_pos
        sched = self._context.settings.scheduler
        self._sched = Scheduler(
            rt.blocks,
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            max_model_len=max_len,
        )
        self._start_tiers(rt, _layout_of(rt.model, self._block_size))
        if agent is not None:
            try:
                await self._start_agent(agent, KvMemory(agent.layout, rt.cache.host_bytes()))
            except BaseException as exc:
                self._state = EngineState.FAILED
                self._failure = exc
                executor.shutdown(wait=False)
                await agent.aclose()
                raise
        self._start_loop()
        log.info(
            "reference engine %s: %s, %d KV blocks of %d tokens%s",
            self._worker_id,
            rt.model.describe(),
            rt.blocks.num_blocks,
            self._block_size,
            f", KV transports {agent.transports}" if agent is not None else "",
        )

    def _start_tiers(self, rt: _Runtime, layout: KvLayout) -> None:
        """The KV tiers ``[kvbm]`` asks for, hooked to the block pool."""
        settings = self._context.settings
        if not settings.kvbm.enabled:
            return
        registry = self._context.registry
        if registry is None:
            from dynamo_gateway.plugins import load_plugins

            registry = load_plugins(only=settings.plugins).registry
        tiers = build_tiered_cache(
            settings,
            registry,
            worker_id=self._worker_id,
            model=self._context.model.served_name,
            layout=layout,
        )
        if tiers is not None:
            self._attach_tiers(tiers, rt.blocks)
            log.info(
                "reference engine %s: KV tiers %s",
                self._worker_id,
                ", ".join(
                    f"{t.name} ({t.capacity_blocks or 'store-managed'} blocks)" for t in tiers.tiers
                ),
            )

    def _read_block(self, block_id: int) -> memoryview:
        rt = self._rt
        assert rt is not None
        block = rt.cache.kv[:, :, block_id]
        if block.device.type != "cpu":
            block = block.to("cpu")
        data: np.ndarray[Any, np.dtype[np.uint8]] = (
            block.contiguous().view(torch.uint8).reshape(-1).numpy()
        )
        return memoryview(data.data)

    def _write_block(self, block_id: int, payload: memoryview) -> None:
        rt = self._rt
        assert rt is not None
        cache = rt.cache
        planes = cache.num_layers * 2
        src = np.frombuffer(payload, dtype=np.uint8).reshape(planes, -1)
        if cache.device.type == "cpu":
            cache.host_bytes()[:, block_id, :] = src
            return
        shape = cache.kv[:, :, block_id].shape
        host = torch.from_numpy(src.copy()).view(cache.dtype).view(shape)
        cache.kv[:, :, block_id].copy_(host.to(cache.device, non_blocking=False))

    def _load_model(self) -> tuple[ReferenceModel, int]:
        """Runs in the worker thread: load the model and size its KV cache."""
        settings = self._context.settings
        ref = settings.reference
        if ref.num_threads is not None:
            torch.set_num_threads(ref.num_threads)
        model = ReferenceModel.load(self._context.model.path, device=ref.device, dtype=ref.dtype)
        if self._context.role is not WorkerRole.AGGREGATED and model.device.type != "cpu":
            raise ConfigError(
                "the reference engine moves KV between workers from host memory only: "
                "run prefill and decode workers with --device cpu"
            )
        num_blocks = settings.cache.num_kv_blocks or auto_num_blocks(
            model.config,
            block_size=self._block_size,
            dtype=model.dtype,
            device=model.device,
            memory_fraction=ref.kv_cache_memory_fraction,
            max_gb=ref.max_kv_cache_gb,
        )
        return model, num_blocks

    def _build(
        self, model: ReferenceModel, num_blocks: int, memory: np.ndarray[Any, Any] | None
    ) -> _Runtime:
        """Runs in the worker thread: allocate the KV cache (on `memory` if given)."""
        cache = PagedKVCache.for_model(
            model.config,
            num_blocks=num_blocks,
            block_size=self._block_size,
            dtype=model.dtype,
            device=model.device,
            memory=memory,
        )
        blocks = BlockManager(num_blocks, self._block_size, record_events=self._events.enabled)
        return _Runtime(model=model, cache=cache, blocks=blocks, sampler=Sampler())

    async def aclose(self) -> None:
        if not await self._stop_loop():
            return
        executor, self._executor = self._executor, None
        if executor is not None:
            # A step may still be running in the thread (its task was cancelled, the
            # thread was not): wait for it before the cache goes away.
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)
        grammar, self._grammar_executor = self._grammar_executor, None
        if grammar is not None:
            grammar.shutdown(wait=False)
        await self._close_agent()
        tiers, self._tiers = self._tiers, None
        if tiers is not None:
            await asyncio.get_running_loop().run_in_executor(None, tiers.close)
        rt, self._rt = self._rt, None
        if rt is not None:
            rt.blocks.clear()
            self._events.publish(rt.blocks.drain_events())

    # -- requests ---------------------------------------------------------------------

    def _logits_vocab_size(self) -> int:
        return self._vocab_size

    def _make_request(self, request: EngineRequest, tokens: list[int], grammar: Any) -> _Request:
        rt = self._rt
        assert rt is not None
        vocab = self._vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            # Caught here: in a step it would fail every request of the batch.
            raise EngineError(
                f"request {request.request_id!r} has token ids outside the vocabulary (0..{vocab})"
            )
        sampling = request.sampling
        constraint = None
        if grammar is not None:
            assert sampling.constraint is not None and self._constraint_compiler is not None
            constraint = self._constraint_compiler.matcher(
                grammar, after_token_ids=sampling.constraint.after_token_ids
            )
        sampler = SequenceSampler(
            sampling,
            eos_token_ids=self._context.model.eos_token_ids,
            prompt_token_ids=request.prompt_token_ids,
            device=rt.model.device,
            constraint=constraint,
        )
        # Resumed tokens were generated (elsewhere): they count for min_tokens,
        # max_tokens and the frequency/presence penalties, and the grammar has seen them.
        for token in request.resumed_token_ids:
            sampler.record(token)
        if constraint is not None and constraint.error is not None:
            raise EngineError(f"request {request.request_id!r}: resumed tokens: {constraint.error}")
        return _Request(
            request.request_id,
            tokens,
            sampling.max_tokens - len(request.resumed_token_ids),
            sampler,
            logprobs=sampling.logprobs is not None,
        )

    # -- the step loop ----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        sched = self._sched
        executor = self._executor
        assert sched is not None and executor is not None
        try:
            while True:
                plan = await self._next_plan()
                if plan is None:
                    continue
                # Copied on the loop: the thread never reads state the loop may change.
                inputs = self._step_inputs(plan)
                samplers = [cast("_Request", seq).sampler for seq in plan.sampling]
                mask = self._start_grammar_mask(samplers)
                results = await loop.run_in_executor(
                    executor, self._compute, inputs, samplers, mask
                )
                self._apply(plan, results)
                self._num_steps += 1
                self._publish_step_events()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(exc)

    @staticmethod
    def _step_inputs(plan: StepPlan) -> list[SeqInput]:
        return [
            SeqInput(
                token_ids=seq.step_tokens,
                start_pos=seq.num_computed,
                block_table=tuple(seq.kv.block_ids),
                want_logits=seq.samples,
            )
            for seq in plan.seqs
        ]

    def _start_grammar_mask(
        self, samplers: list[SequenceSampler]
    ) -> Future[GrammarMask | None] | None:
        """Start filling the step's grammar bitmask beside the forward pass; None: the
        sampler fills it (nothing is constrained, or `GRAMMAR_ASIDE` says so)."""
        rt = self._rt
        if rt is None or not any(s.constrained for s in samplers):
            return None
        aside = GRAMMAR_ASIDE if GRAMMAR_ASIDE is not None else rt.model.device.type != "cpu"
        if not aside:
            return None
        if self._grammar_executor is None:
            self._grammar_executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"ref-{self._worker_id}-grammar"
            )
        return self._grammar_executor.submit(rt.sampler.grammar_mask, samplers)

    def _compute(
        self,
        inputs: list[SeqInput],
        samplers: list[SequenceSampler],
        mask: Future[GrammarMask | None] | None = None,
    ) -> StepResult:
        """Runs in the worker thread: one forward pass, then one token per sampling row."""
        rt = self._rt
        # aclose() waits for the executor before it drops the runtime.
        assert rt is not None
        model = rt.model
        batch = ForwardBatch.build(seqs=inputs, block_size=self._block_size, device=model.device)
        logits = model.forward(batch, rt.cache)
        if not samplers:
            return []
        return rt.sampler(logits, samplers, mask.result() if mask is not None else None)

    def _apply(self, plan: StepPlan, results: StepResult) -> None:
        """Back on the loop: record the tokens, apply stop rules, complete the step."""
        assert self._sched is not None
        sampled: list[int] = []
        stops: list[FinishReason | None] = []
        live: list[_Request] = []
        for req, (token, logprob) in zip(
            cast("list[_Request]", plan.sampling), results, strict=True
        ):
            sampled.append(token)
            if req.status is not _RUNNING:
                stops.append(None)  # ended while the step ran: complete() drops it
                continue
            req.sampler.record(token)
            if req.logprobs is not None and logprob is not None:
                req.logprobs.append(logprob)
            # STOP (EOS, stop ids) or LENGTH (max_tokens, resumed tokens included);
            # the scheduler adds LENGTH at the context window.
            stops.append(req.sampler.finish_reason(token))
            live.append(req)
        self._sched.complete(plan, sampled, stops)
        for req in live:
            constraint = req.sampler.constraint
            if constraint is not None and constraint.error is not None:
                req.error = constraint.error  # finished with ERROR (finish_reason())
            req.wake()
