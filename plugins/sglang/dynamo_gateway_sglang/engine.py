"""The ``sglang`` engine: SGLang's offline `sglang.Engine` inside one dynamo-gateway worker.

* **Requests** go in as token ids (``input_ids``) with ``stream=True``; SGLang
  runs with ``skip_tokenizer_init`` (the frontend owns the tokenizer and stop
  strings). Streamed outputs are cumulative or incremental depending on
  ``incremental_streaming_output``; `translate.stream_delta` turns both into deltas.
* **Abort** is `TokenizerManager.abort_request(rid)`; SGLang then ends the stream
  with an ``abort`` finish reason.
* **Load** is the schedulers' `LoadSnapshot`s, which SGLang keeps in shared memory
  for its own tokenizer manager (`load_snapshot_reader.read_all()`, no round trip).
* **KV events**: SGLang's ZMQ publisher binds an ``ipc://`` socket private to this
  worker; `kv_events.SglangZmqSubscriber` re-keys its blocks by our hashes.
* **Disaggregation** maps our two legs onto SGLang's bootstrap rooms (README,
  "Disaggregation"): a prefill leg submits the request to SGLang's prefill
  engine under a fresh room and returns at once with the room as its handoff;
  the decode leg sends the same request with that room to SGLang's decode
  engine, and the two SGLang sides meet as they do behind SGLang's own router.

SGLang keeps its runtime configuration in process globals, so a process holds one
engine at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from types import ModuleType
from typing import Any

import msgspec

from dynamo_gateway.disagg.params import wants_remote_decode
from dynamo_gateway.engines.base import EngineContext, EngineState
from dynamo_gateway.engines.library import LibraryEngine
from dynamo_gateway.errors import ConfigError, EngineError, InvalidRequestError
from dynamo_gateway.kv.vllm_events import VllmEventTranslator
from dynamo_gateway.protocol.engine import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    LoadMetrics,
)
from dynamo_gateway_sglang import translate
from dynamo_gateway_sglang.config import SglangSettings, sglang_settings
from dynamo_gateway_sglang.kv_events import SglangZmqSubscriber

__all__ = ["SglangEngine"]

log = logging.getLogger(__name__)

# The one engine of this process (SGLang's runtime context is per process).
_OWNER: list[SglangEngine] = []


def _local_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _build(sglang: ModuleType, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Start SGLang (spawns the scheduler and detokenizer; minutes) in a thread."""
    engine = sglang.Engine(**kwargs)
    return engine, dict(engine.server_args.resolved_dict())


class SglangEngine(LibraryEngine):
    """One worker's SGLang engine (see the module docstring)."""

    kind = "sglang"

    def __init__(self, context: EngineContext, sglang: ModuleType) -> None:
        super().__init__(context)
        self._sglang = sglang
        self._settings: SglangSettings = sglang_settings(context.settings)
        self._engine: Any = None
        self._server: translate.ResolvedServer | None = None
        self._bootstrap_host = ""
        self._subscriber: SglangZmqSubscriber | None = None
        self._live: set[str] = set()
        # Prefill legs whose SGLang request outlives the leg (until the decode side pulls).
        self._detached: dict[str, asyncio.Task[None]] = {}
        self._last_load = LoadMetrics()

    # -- Engine protocol (lifecycle: LibraryEngine) ---------------------------------

    async def start(self) -> None:
        if self._state is not EngineState.CREATED:
            return
        if _OWNER:
            raise ConfigError(
                f"this process already runs SGLang engine {_OWNER[0]._context.worker_id}; "
                "SGLang allows one per process: start each worker with `dynamo-gateway worker`"
            )
        _OWNER.append(self)
        await super().start()

    async def _start(self) -> None:
        context = self._context
        settings = context.settings
        endpoint = self.kv_event_endpoint() if context.publish_kv_event is not None else None
        kwargs = translate.server_kwargs(
            str(context.model.path),
            block_size=settings.cache.block_size,
            max_model_len=settings.max_model_len or context.model.max_model_len,
            role=context.role,
            kv_events_endpoint=endpoint,
            user=self._settings.server_args,
        )
        log.info(
            "starting SGLang %s for %s: %s",
            getattr(self._sglang, "__version__", "?"),
            context.worker_id,
            kwargs,
        )
        try:
            self._engine, info = await asyncio.to_thread(_build, self._sglang, kwargs)
        except (TypeError, ValueError) as exc:
            # Unknown ServerArgs fields (TypeError) and values SGLang refuses (ValueError).
            raise ConfigError(f"SGLang refused its server args: {exc}") from exc
        server = self._server = translate.resolved_server(info)
        self._block_size = server.page_size
        self._bootstrap_host = translate.advertised_host(
            self._settings.bootstrap_host, server.host, _local_address()
        )
        if endpoint is not None and context.publish_kv_event is not None:
            translator = VllmEventTranslator(context.worker_id, self._block_size)
            self._subscriber = SglangZmqSubscriber(endpoint, translator, context.publish_kv_event)
            self._subscriber.start()

    def _require_running(self) -> translate.ResolvedServer:
        if self._state is not EngineState.RUNNING or self._server is None:
            raise EngineError(f"sglang engine {self._context.worker_id} is {self._state.value}")
        return self._server

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        server = self._require_running()
        prompt, left = translate.prompt_of(request)
        sampling = translate.sampling_params(
            request.sampling, max_new_tokens=left, deterministic=server.deterministic
        )
        params = request.kv_transfer_params
        k = request.sampling.logprobs
        kwargs: dict[str, Any] = {
            "input_ids": prompt,
            "sampling_params": sampling,
            "stream": True,
            "return_logprob": k is not None,
            "top_logprobs_num": k or 0,
            "rid": request.request_id,
        }
        if server.disaggregation_mode == "prefill" and wants_remote_decode(params):
            yield await self._prefill_leg(request.request_id, kwargs, server)
            return
        if server.disaggregation_mode == "decode":
            try:
                bootstrap = translate.bootstrap_args(params)
            except ValueError as exc:
                bootstrap, problem = None, str(exc)
            else:
                problem = "a request without an SGLang prefill handoff"
            if bootstrap is None:
                # SGLang's decode mode cannot compute a prompt by itself.
                yield EngineOutput(
                    token_ids=[],
                    finish_reason=FinishReason.ERROR,
                    error=f"SGLang decode worker {self._context.worker_id} got {problem}",
                )
                return
            kwargs.update(bootstrap)
        # Closed explicitly: a consumer that leaves must abort the request now, not
        # whenever the inner generator is collected.
        inner = self._stream(request.request_id, kwargs, server, k)
        try:
            async for out in inner:
                yield out
        finally:
            await inner.aclose()

    async def _stream(
        self, rid: str, kwargs: dict[str, Any], server: translate.ResolvedServer, k: int | None
    ) -> AsyncGenerator[EngineOutput, None]:
        stream = await self._engine.async_generate(**kwargs)
        self._live.add(rid)
        seen = 0
        first = True
        finished = False
        try:
            try:
                async for out in stream:
                    delta, seen = translate.stream_delta(
                        out, seen=seen, incremental=server.incremental_streaming, first=first, k=k
                    )
                    if delta is None:
                        continue
                    first = False
                    finished = delta.finish_reason is not None
                    yield delta
                    if finished:
                        return
            except ValueError as exc:
                # The tokenizer manager validates before dispatching: a bad request.
                finished = True
                if first:
                    raise InvalidRequestError(f"SGLang refused the request: {exc}") from exc
                yield EngineOutput(token_ids=[], finish_reason=FinishReason.ERROR, error=str(exc))
                return
            finished = True
            yield EngineOutput(
                token_ids=[], finish_reason=FinishReason.ERROR, error="the SGLang stream ended"
            )
        finally:
            self._live.discard(rid)
            if not finished:
                self._abort_in_sglang(rid)
            await stream.aclose()

    async def _prefill_leg(
        self, rid: str, kwargs: dict[str, Any], server: translate.ResolvedServer
    ) -> EngineOutput:
        """Submit the prefill under a new room and hand the room over at once.

        SGLang's prefill waits in its bootstrap queue for the decode side to
        connect, so it cannot finish before the decode leg starts: the request
        runs detached from the leg and ends when SGLang has sent the KV (or its
        bootstrap timeout fails it).
        """
        room = secrets.randbits(63)
        kwargs = {
            **kwargs,
            "bootstrap_host": self._bootstrap_host,
            "bootstrap_port": server.bootstrap_port,
            "bootstrap_room": room,
        }
        task = asyncio.get_running_loop().create_task(
            self._drain(rid, kwargs), name=f"sglang-prefill-{rid}"
        )
        self._detached[rid] = task
        task.add_done_callback(lambda _: self._detached.pop(rid, None))
        return EngineOutput(
            token_ids=[],
            finish_reason=FinishReason.LENGTH,
            kv_transfer_params=translate.bootstrap_params(
                self._bootstrap_host, server.bootstrap_port, room
            ),
        )

    async def _drain(self, rid: str, kwargs: dict[str, Any]) -> None:
        try:
            stream = await self._engine.async_generate(**kwargs)
            async for out in stream:
                meta = out.get("meta_info") or {}
                _, error = translate.finish_reason(meta.get("finish_reason"))
                if error is not None:
                    log.warning("SGLang prefill of %s failed: %s", rid, error)
        except asyncio.CancelledError:
            self._abort_in_sglang(rid)
            raise
        except Exception:
            log.exception("SGLang prefill of %s failed", rid)

    def _abort_in_sglang(self, rid: str) -> None:
        engine = self._engine
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.tokenizer_manager.abort_request(rid)

    async def abort(self, request_id: str) -> None:
        if request_id in self._live or request_id in self._detached:
            self._abort_in_sglang(request_id)

    async def check_health(self) -> None:
        self._require_running()
        try:
            pids = list(self._engine.get_all_child_pids())
        except Exception as exc:
            raise EngineError(f"sglang engine {self._context.worker_id}: {exc}") from exc
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise EngineError(
                    f"sglang engine {self._context.worker_id}: its process {pid} is gone"
                ) from None
            except PermissionError:
                pass

    def load(self) -> LoadMetrics:
        engine, server = self._engine, self._server
        if engine is None or server is None:
            return LoadMetrics()
        try:
            snapshots = engine.tokenizer_manager.load_snapshot_reader.read_all()
            rows = [msgspec.structs.asdict(s) for s in snapshots]
        except Exception:
            # A reader that is not attached yet (no scheduler step so far).
            return self._last_load
        if rows:
            self._last_load = translate.load_metrics(rows, server.page_size)
        return self._last_load

    async def aclose(self) -> None:
        if self._state is not EngineState.STOPPED:
            for rid in [*self._live, *self._detached]:
                self._abort_in_sglang(rid)
        await super().aclose()

    async def _release(self) -> None:
        for task in list(self._detached.values()):
            task.cancel()
        for task in list(self._detached.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._detached.clear()
        if self._subscriber is not None:
            await self._subscriber.aclose()
            self._subscriber = None
        engine, self._engine = self._engine, None
        if engine is not None:
            # Kills SGLang's scheduler and detokenizer processes and waits for them.
            await asyncio.to_thread(engine.shutdown)
        if self in _OWNER:
            _OWNER.remove(self)
        await super()._release()
