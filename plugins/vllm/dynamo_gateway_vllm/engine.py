"""The ``vllm`` engine: vLLM's `AsyncLLM` inside one dynamo-gateway worker.

* **Requests** go in as token ids (`TokensPrompt`) with `RequestOutputKind.DELTA`
  and ``detokenize=False``: the frontend owns the tokenizer and stop strings.
* **Load** comes from vLLM's own scheduler stats, through a stat logger that
  keeps the latest `SchedulerStats` (running, waiting, KV cache usage).
* **KV events**: vLLM's ZMQ publisher binds an ``ipc://`` socket private to this
  worker; `dynamo_gateway.kv.vllm_events` subscribes, re-keys the blocks by our
  sequence hashes and hands them to the worker's event plane, so the ``kv``
  router sees vLLM's cache the way it sees ours.
* **Disaggregation** (roles prefill / decode) runs over vLLM's NixlConnector: a
  prefill leg (``{"do_remote_decode": true}``) asks vLLM for one token more than
  the frontend wants, so that the first token's KV is computed too, and returns
  vLLM's handoff; the decode leg sends prompt + first token with that handoff,
  and vLLM pulls every block it needs from the prefill worker. A decode leg whose
  params are not a vLLM handoff is computed locally (same tokens, no transfer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from dynamo_gateway.engines.base import EngineContext, EngineState
from dynamo_gateway.engines.library import LibraryEngine
from dynamo_gateway.errors import EngineError, InvalidRequestError
from dynamo_gateway.kv.vllm_events import VllmEventTranslator, VllmZmqSubscriber
from dynamo_gateway.protocol.engine import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    LoadMetrics,
    WorkerRole,
)
from dynamo_gateway_vllm import translate

if TYPE_CHECKING:
    from types import ModuleType

log = logging.getLogger(__name__)

# Engines of one process start one at a time: each sets the environment its spawned
# engine-core process inherits.
_SPAWN_LOCK = asyncio.Lock()
# The environment as the user gave it, before any worker's spawn settings.
_USER_ENV = dict(os.environ)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


__all__ = ["VllmEngine"]


class _Stats:
    """The latest scheduler stats of the engine (written by vLLM's output handler)."""

    running = 0
    waiting = 0
    kv_usage = 0.0


def _stat_logger_factory(vllm: ModuleType, stats: _Stats) -> Any:
    """A `StatLoggerBase` subclass that records into `stats` (vLLM builds it itself)."""
    base: Any = vllm.v1.metrics.loggers.StatLoggerBase

    class _Recorder(base):  # type: ignore[misc]
        def __init__(self, vllm_config: object, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                stats.running = int(scheduler_stats.num_running_reqs)
                stats.waiting = int(scheduler_stats.num_waiting_reqs)
                stats.kv_usage = float(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self) -> None:
            pass

    return _Recorder


class VllmEngine(LibraryEngine):
    """One worker's vLLM engine (see the module docstring)."""

    kind = "vllm"

    def __init__(self, context: EngineContext, vllm: ModuleType) -> None:
        super().__init__(context)
        self._vllm = vllm
        self._llm: Any = None
        self._stats = _Stats()
        self._num_blocks = 0
        self._max_logprobs = 20
        self._subscriber: VllmZmqSubscriber | None = None
        self._live: set[str] = set()

    # -- Engine protocol (lifecycle: LibraryEngine) ---------------------------------

    async def _start(self) -> None:
        vllm = self._vllm
        context = self._context
        settings = context.settings
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        endpoint = self.kv_event_endpoint() if context.publish_kv_event is not None else None
        user_block = "--block-size" in settings.engine_args or any(
            a.startswith("--block-size=") for a in settings.engine_args
        )
        # vLLM-CPU's attention needs blocks of a multiple of 32 tokens.
        block = settings.cache.block_size
        on_cpu = bool(current_platform.is_cpu())
        if on_cpu and block % 32:
            block = 32
        argv = translate.engine_argv(
            context.model.path,
            max_model_len=settings.max_model_len or context.model.max_model_len,
            block_size=None if user_block else block,
            kv_events_endpoint=endpoint,
            kv_role=translate.kv_role(context.role),
            on_cpu=on_cpu,
            user_args=[
                *translate.offload_args(
                    host_cache_gb=settings.kvbm.host_cache_gb,
                    disk_cache=settings.kvbm.disk_cache_dir is not None,
                    remote_url=settings.kvbm.remote_url,
                    on_cpu=on_cpu,
                    disaggregated=translate.kv_role(context.role) is not None,
                ),
                *settings.engine_args,
            ],
        )
        parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm"))
        try:
            ns = parser.parse_args(argv)
        except SystemExit as exc:
            raise EngineError(f"bad vLLM engine arguments {settings.engine_args!r}") from exc
        args = AsyncEngineArgs.from_cli_args(ns)
        log.info("starting vLLM %s for %s: %s", vllm.__version__, context.worker_id, argv)
        factory = _stat_logger_factory(vllm, self._stats)
        spawn_env: dict[str, str] = {}
        if context.role is not WorkerRole.AGGREGATED:
            # NixlConnector's handshake listener binds this port in the engine-core
            # process: one per worker, or a second worker on the host cannot start.
            spawn_env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(_free_port())
        if on_cpu:
            ncpus = len(os.sched_getaffinity(0))
            spawn_env.update(translate.cpu_thread_env(context.role, ncpus, _USER_ENV))
        async with _SPAWN_LOCK:
            # The engine-core process inherits this process's environment when it is
            # spawned; the lock keeps each worker's values to its own spawn.
            saved = {k: os.environ.get(k) for k in spawn_env}
            os.environ.update(spawn_env)
            try:
                # The constructor spawns the engine-core process and waits (seconds).
                self._llm = await asyncio.to_thread(
                    AsyncLLM.from_engine_args, args, stat_loggers=[factory]
                )
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        self._llm._run_output_handler()  # bind the output handler to this loop
        cache = self._llm.vllm_config.cache_config
        self._block_size = int(cache.block_size)
        self._num_blocks = int(cache.num_gpu_blocks or 0)
        self._max_logprobs = int(self._llm.vllm_config.model_config.max_logprobs)
        if endpoint is not None and context.publish_kv_event is not None:
            translator = VllmEventTranslator(context.worker_id, self._block_size)
            self._subscriber = VllmZmqSubscriber(endpoint, translator, context.publish_kv_event)
            self._subscriber.start()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self._check_running()
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import (
            RequestOutputKind,
            SamplingParams,
            StructuredOutputsParams,
        )

        prompt, left = translate.prompt_of(request)
        params = request.kv_transfer_params
        prefill = bool(params and params.get("do_remote_decode"))
        vllm_params: dict[str, Any] | None = None
        if prefill:
            vllm_params = {"do_remote_decode": True}
        elif translate.is_vllm_handoff(params):
            vllm_params = dict(params or {})
        # A prefill leg computes one token more, so that the first one's KV is there too.
        kwargs = translate.sampling_kwargs(
            request.sampling,
            max_tokens=left + 1 if prefill else left,
            max_logprobs=self._max_logprobs,
        )
        structured = translate.structured_outputs_kwargs(request.sampling.constraint)
        extra = None if vllm_params is None else {"kv_transfer_params": vllm_params}
        try:
            if structured is not None:
                kwargs["structured_outputs"] = StructuredOutputsParams(**structured)
            sampling = SamplingParams(
                **kwargs, output_kind=RequestOutputKind.DELTA, extra_args=extra
            )
        except VLLMValidationError as exc:
            raise InvalidRequestError(f"vLLM refused the request: {exc}") from None
        rid = request.request_id
        stream = self._llm.generate(TokensPrompt(prompt_token_ids=prompt), sampling, rid)
        self._live.add(rid)
        finished = False
        try:
            if prefill:
                yield await self._prefill(stream, left, request.sampling.logprobs)
                finished = True
                return
            first = True
            async for out in stream:
                completion = out.outputs[0]
                tokens = list(completion.token_ids)
                reason: str | None = completion.finish_reason
                if not tokens and reason is None:
                    continue
                delta = translate.delta_output(
                    tokens,
                    reason,
                    cached_tokens=int(out.num_cached_tokens or 0) if first else None,
                    logprobs=translate.to_logprobs(
                        tokens, completion.logprobs, request.sampling.logprobs
                    ),
                )
                first = False
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
            finished = True
            yield EngineOutput(
                token_ids=[], finish_reason=FinishReason.ERROR, error="the vLLM stream ended"
            )
        except VLLMValidationError as exc:  # e.g. a schema its grammar backend cannot compile
            finished = True
            raise InvalidRequestError(f"vLLM refused the request: {exc}") from None
        finally:
            self._live.discard(rid)
            if not finished:
                with contextlib.suppress(Exception):
                    await self._llm.abort(rid)

    @staticmethod
    async def _prefill(stream: AsyncIterator[Any], left: int, k: int | None) -> EngineOutput:
        """Run a prefill leg to vLLM's end (one extra token) and report `left` tokens."""
        tokens: list[int] = []
        entries: list[Any] = []
        reason: str | None = None
        cached: int | None = None
        handoff: dict[str, Any] | None = None
        async for out in stream:
            completion = out.outputs[0]
            if cached is None:
                cached = int(out.num_cached_tokens or 0)
            tokens.extend(completion.token_ids)
            if completion.logprobs is not None:
                entries.extend(completion.logprobs)
            if out.finished:
                reason = completion.finish_reason
                handoff = out.kv_transfer_params
        if reason is None:
            return EngineOutput(
                token_ids=[], finish_reason=FinishReason.ERROR, error="the vLLM stream ended"
            )
        # Stopped (EOS, stop token) within the tokens the client gets: the request ends here.
        stopped = reason != "length" and len(tokens) <= left
        kept = tokens[:left]
        return translate.delta_output(
            kept,
            reason if stopped else "length",
            cached_tokens=cached,
            logprobs=translate.to_logprobs(kept, entries[: len(kept)] if k else None, k),
            kv_transfer_params=None if stopped else handoff,
        )

    @staticmethod
    async def _drain(stream: AsyncIterator[Any]) -> None:
        async for _ in stream:
            pass

    async def abort(self, request_id: str) -> None:
        if self._llm is None or request_id not in self._live:
            return
        await self._llm.abort(request_id)

    async def check_health(self) -> None:
        if self._state is not EngineState.RUNNING or self._llm is None:
            raise EngineError(f"vllm engine {self._context.worker_id} is {self._state.value}")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineError(f"vllm engine {self._context.worker_id}: {exc}") from exc

    def load(self) -> LoadMetrics:
        s = self._stats
        return translate.load_metrics(s.running, s.waiting, s.kv_usage, self._num_blocks)

    async def aclose(self) -> None:
        if self._llm is not None and self._state is not EngineState.STOPPED:
            with contextlib.suppress(Exception):
                await self._llm.abort(list(self._live))
        await super().aclose()

    async def _release(self) -> None:
        if self._subscriber is not None:
            await self._subscriber.aclose()
            self._subscriber = None
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)
        await super()._release()
