"""`TrtllmEngine`: one worker's ``tensorrt_llm.LLM``, behind our `Engine` protocol.

The LLM lives in the worker process (TensorRT-LLM starts its own executor
workers under it). Requests go through ``LLM.generate_async(..., streaming=True)``
and come back as cumulative ``RequestOutput``s, turned into deltas by
`translate.completion_delta`. Two background tasks poll the executor:
``get_kv_cache_events_async`` (re-keyed by `kv_events.TrtllmEventTranslator`, then
published through `EngineContext.publish_kv_event`) and ``get_stats_async``
(kept as the latest `LoadMetrics`, so `load()` stays synchronous and cheap).

``tensorrt_llm`` arrives as a module object from the factory: this file never
imports it, so the plugin lists and type-checks without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from dynamo_gateway.engines.base import EngineContext, EngineState
from dynamo_gateway.engines.library import LibraryEngine
from dynamo_gateway.errors import EngineError, InvalidRequestError
from dynamo_gateway.protocol.engine import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    LoadMetrics,
    WorkerRole,
)
from dynamo_gateway_trtllm.kv_events import TrtllmEventTranslator
from dynamo_gateway_trtllm.settings import TrtllmSettings
from dynamo_gateway_trtllm.translate import (
    DeltaState,
    GenerationPlan,
    completion_delta,
    encode_handoff,
    guided_decoding_kwargs,
    load_from_stats,
    plan_generation,
    sampling_kwargs,
)

__all__ = ["TrtllmEngine", "llm_kwargs"]

log = logging.getLogger(__name__)


def llm_kwargs(trtllm: Any, context: EngineContext, opts: TrtllmSettings) -> dict[str, Any]:
    """Keyword arguments of ``tensorrt_llm.LLM`` for this worker."""
    settings = context.settings
    llmapi = importlib.import_module(f"{trtllm.__name__}.llmapi")
    kv = llmapi.KvCacheConfig(
        enable_block_reuse=opts.enable_block_reuse,
        event_buffer_max_size=opts.event_buffer_max_size if context.publish_kv_event else 0,
        free_gpu_memory_fraction=opts.free_gpu_memory_fraction,
        tokens_per_block=settings.cache.block_size,
        **(
            {"max_tokens": settings.cache.num_kv_blocks * settings.cache.block_size}
            if settings.cache.num_kv_blocks
            else {}
        ),
    )
    kw: dict[str, Any] = {
        "model": str(context.model.path),
        "tensor_parallel_size": opts.tensor_parallel_size,
        "dtype": opts.dtype,
        "skip_tokenizer_init": opts.skip_tokenizer_init,
        "kv_cache_config": kv,
        "max_batch_size": settings.scheduler.max_num_seqs,
        "max_num_tokens": settings.scheduler.max_num_batched_tokens,
        "max_seq_len": context.model.max_model_len,
        "enable_iter_perf_stats": opts.iter_stats,
    }
    if context.role is not WorkerRole.AGGREGATED:
        kw["cache_transceiver_config"] = llmapi.CacheTransceiverConfig(
            backend=opts.cache_transceiver_backend
        )
    kw.update(opts.llm_args)
    return kw


class TrtllmEngine(LibraryEngine):
    """TensorRT-LLM's LLM API as an `Engine` (see the module docstring)."""

    def __init__(
        self,
        context: EngineContext,
        trtllm: Any,
        opts: TrtllmSettings,
        *,
        llm_factory: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(context)
        self._trtllm = trtllm
        self._opts = opts
        self._llm_factory = llm_factory  # None: trtllm.LLM, looked up by start()
        self._llm: Any = None
        self._inflight: dict[str, Any] = {}  # our request id -> RequestOutput
        self._load = LoadMetrics()
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: str | None = None
        self._translator = TrtllmEventTranslator(context.worker_id, self._block_size)
        self._disagg_cls: Any = None

    @property
    def translator(self) -> TrtllmEventTranslator:
        return self._translator

    async def _start(self) -> None:
        if self._opts.skip_tokenizer_init and not self._context.model.eos_token_ids:
            raise EngineError("skip_tokenizer_init needs the model's eos ids (none in its config)")
        try:
            kwargs = llm_kwargs(self._trtllm, self._context, self._opts)
            # Building loads weights and may compile: minutes, off the event loop.
            factory = self._llm_factory or self._trtllm.LLM
            self._llm = await asyncio.to_thread(factory, **kwargs)
            if self._context.role is not WorkerRole.AGGREGATED:
                module = importlib.import_module(f"{self._trtllm.__name__}.disaggregated_params")
                self._disagg_cls = module.DisaggregatedParams
        except Exception as exc:
            self._failure = repr(exc)
            raise EngineError(f"TensorRT-LLM failed to start: {exc}") from exc
        loop = asyncio.get_running_loop()
        if self._context.publish_kv_event is not None and self._opts.event_buffer_max_size:
            self._tasks.append(loop.create_task(self._poll_kv_events(), name="trtllm-kv-events"))
        if self._opts.iter_stats:
            self._tasks.append(loop.create_task(self._poll_stats(), name="trtllm-stats"))

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self._state is not EngineState.RUNNING:
            raise EngineError(f"the trtllm engine is {self._state.value}")
        plan = plan_generation(request)
        kw = sampling_kwargs(
            request.sampling,
            max_tokens=plan.max_tokens,
            eos_token_ids=self._context.model.eos_token_ids,
            max_logprobs=self._opts.max_logprobs,
        )
        guided = guided_decoding_kwargs(request.sampling.constraint)
        if guided is not None:
            module = importlib.import_module(f"{self._trtllm.__name__}.sampling_params")
            kw["guided_decoding"] = module.GuidedDecodingParams(**guided)
        disagg = self._disaggregated(plan)
        try:
            result = self._llm.generate_async(
                plan.prompt_token_ids,
                sampling_params=self._trtllm.SamplingParams(**kw),
                streaming=True,
                disaggregated_params=disagg,
            )
        except ValueError as exc:  # TensorRT-LLM's argument checks (lengths, limits)
            raise InvalidRequestError(f"TensorRT-LLM refused the request: {exc}") from exc
        except Exception as exc:
            raise EngineError(f"TensorRT-LLM failed to submit the request: {exc}") from exc
        rid = request.request_id
        self._inflight[rid] = result
        state = DeltaState()
        finished = False
        try:
            async for ro in result:
                cached = getattr(ro, "cached_tokens", None)
                out, state = completion_delta(
                    ro.outputs[0],
                    state,
                    plan=plan,
                    logprobs=request.sampling.logprobs,
                    cached_tokens=cached,
                )
                if out.finish_reason is None and not out.token_ids:
                    continue
                if out.finish_reason is not None:
                    finished = True
                    if plan.context_only and out.finish_reason is FinishReason.LENGTH:
                        out.kv_transfer_params = encode_handoff(
                            ro.outputs[0].disaggregated_params,
                            worker_id=self._context.worker_id,
                            num_tokens=len(plan.prompt_token_ids),
                        )
                yield out
                if finished:
                    return
            if not finished:
                # The stream ended without a finish reason: aborted under us, or shut down.
                finished = True
                yield EngineOutput(token_ids=[], finish_reason=FinishReason.ABORT)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except EngineError:
            raise
        except Exception as exc:
            finished = True
            yield EngineOutput(token_ids=[], finish_reason=FinishReason.ERROR, error=repr(exc))
        finally:
            self._inflight.pop(rid, None)
            if not finished:
                self._abort_result(result)

    def _disaggregated(self, plan: GenerationPlan) -> Any:
        if plan.disaggregated is None:
            return None
        if self._disagg_cls is None:
            module = importlib.import_module(f"{self._trtllm.__name__}.disaggregated_params")
            self._disagg_cls = module.DisaggregatedParams
        return self._disagg_cls(**plan.disaggregated)

    @staticmethod
    def _abort_result(result: Any) -> None:
        try:
            result.abort()
        except Exception:  # already finished, or the executor is gone
            log.debug("abort of a TensorRT-LLM request failed", exc_info=True)

    async def abort(self, request_id: str) -> None:
        result = self._inflight.get(request_id)
        if result is not None:
            self._abort_result(result)

    async def check_health(self) -> None:
        if self._state is not EngineState.RUNNING:
            raise EngineError(f"the trtllm engine is {self._state.value}")
        if self._failure is not None:
            raise EngineError(f"the trtllm engine failed: {self._failure}")

    def load(self) -> LoadMetrics:
        if self._load.active_requests or self._load.kv_blocks_total or not self._inflight:
            return self._load
        # No stats yet (or stats off): at least the requests we know of.
        return LoadMetrics(active_requests=len(self._inflight))

    async def aclose(self) -> None:
        if self._state is not EngineState.STOPPED:
            for result in list(self._inflight.values()):
                self._abort_result(result)
        await super().aclose()

    async def _release(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)
        await super()._release()

    # -- background polling ----------------------------------------------------------------

    async def _poll_kv_events(self) -> None:
        sink = self._context.publish_kv_event
        assert sink is not None
        await self._poll(self._llm.get_kv_cache_events_async, lambda ev: self._publish(sink, ev))

    def _publish(self, sink: Callable[[Any], None], event: Any) -> None:
        if not isinstance(event, dict):
            return
        for ours in self._translator.translate(event):
            sink(ours)

    async def _poll_stats(self) -> None:
        await self._poll(self._llm.get_stats_async, self._take_stats)

    def _take_stats(self, stats: Any) -> None:
        if isinstance(stats, dict):
            self._load = load_from_stats(stats)

    async def _poll(self, source: Callable[..., Any], handle: Callable[[Any], None]) -> None:
        """Drain ``source(timeout)`` forever. Its IterationResult stops after
        `poll_timeout_s` without data and stays "done" until marked undone, so
        each round marks it undone and waits a little between rounds."""
        timeout = self._opts.poll_timeout_s
        while True:
            try:
                results = source(timeout)
                mark = getattr(results, "mark_undone", None)
                if mark is not None:
                    mark()
                async for item in results:
                    try:
                        handle(item)
                    except Exception:
                        log.exception("handling a TensorRT-LLM background result failed")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("polling TensorRT-LLM failed; retrying")
            await asyncio.sleep(min(timeout, 0.2))
