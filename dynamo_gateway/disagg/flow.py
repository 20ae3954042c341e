"""The frontend's two-leg stream: prefill on one worker, decode on another.

`DisaggRouted` has the interface of `runtime.pool.Routed` (``outputs``,
``first_token()``, ``close()``), so the generation code does not know which
one it got. The prefill leg is the request with ``max_tokens=1`` and
``{"do_remote_decode": true}``; its token goes to the client at once (TTFT is
the prefill's). The decode leg is the request with that token resumed and the
prefill's `kv_transfer_params`, run as a `Routed` on the decode worker (so a
lost decode worker migrates the request like any other). A prefill leg that
fails, ends without a token or without params turns into an aggregated
request on the decode worker: the client never sees the difference.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from dynamo_gateway.disagg.params import (
    decode_leg,
    prefill_leg,
    prefill_leg_failed,
    release_abandoned,
)
from dynamo_gateway.disagg.policy import LocalReason
from dynamo_gateway.errors import EngineError
from dynamo_gateway.protocol.engine import EngineOutput, EngineRequest, FinishReason, TokenLogprob

if TYPE_CHECKING:
    from dynamo_gateway.router.base import RouteRequest
    from dynamo_gateway.runtime.pool import ModelPool, Routed, WorkerHandle

__all__ = ["DisaggRouted"]

log = logging.getLogger(__name__)


class DisaggRouted:
    """One request as a prefill leg, then a decode leg (see the module docstring).

    The caller has counted the request in flight on `decode` (inflight and the
    router's `on_routed`), as for a `Routed`; the prefill leg's bookkeeping is
    this object's.
    """

    def __init__(
        self,
        pool: ModelPool,
        route: RouteRequest,
        request: EngineRequest,
        prefill: WorkerHandle,
        decode: WorkerHandle,
        prefill_tokens: int,
    ) -> None:
        self._pool = pool
        self._route = route
        self._request = request
        self.request_id = request.request_id
        self.prefill = prefill
        self.worker = decode
        self._prefill_tokens = prefill_tokens
        self._leg: AsyncIterator[EngineOutput] | None = None
        self._decode: Routed | None = None
        self._prefill_open = False
        self._closed = False
        self.outputs: AsyncIterator[EngineOutput] = self
        pool.prefill_started(route, prefill, prefill_tokens)
        self._prefill_open = True

    def first_token(self) -> None:
        self._pool.first_token(self.request_id)

    def __aiter__(self) -> DisaggRouted:
        return self

    async def __anext__(self) -> EngineOutput:
        if self._decode is None:
            return await self._run_prefill()
        self._decode.started = True
        out = await self._decode.outputs.__anext__()
        out.cached_tokens = None  # the prefill leg's first output reported them
        return out

    async def _run_prefill(self) -> EngineOutput:
        request = self._request
        leg = prefill_leg(request)
        tokens: list[int] = []
        logprobs: list[TokenLogprob] | None = None
        cached: int | None = None
        last: EngineOutput | None = None
        failure: str | None = None
        self._leg = stream = self.prefill.generate(leg)
        try:
            async for out in stream:
                if cached is None:
                    cached = out.cached_tokens
                tokens.extend(out.token_ids)
                if out.logprobs:
                    logprobs = [*(logprobs or []), *out.logprobs]
                last = out
                if out.finish_reason is not None:
                    break
        except EngineError as exc:  # WorkerLostError included
            failure = str(exc)
        except OSError as exc:
            failure = repr(exc)
        finally:
            await self._end_prefill()
        if failure is None and (last is None or last.finish_reason is None):
            failure = "the prefill leg ended without a finish reason"
        elif failure is None and last is not None and prefill_leg_failed(last, tokens):
            failure = last.error or f"the prefill leg ended with {last.finish_reason}"
        if failure is not None:
            # Aggregated on the decode worker; the client sees nothing of it.
            log.warning(
                "request %s: prefill on %s failed (%s); prefilling on %s",
                self.request_id,
                self.prefill.record.worker_id,
                failure,
                self.worker.record.worker_id,
            )
            self._pool.count_local(LocalReason.PREFILL_FAILED)
            self._start_decode(request)
            return await self.__anext__()
        assert last is not None
        params = last.kv_transfer_params
        first = EngineOutput(token_ids=tokens, cached_tokens=cached, logprobs=logprobs)
        if last.finish_reason is FinishReason.STOP or params is None:
            # EOS (or a stop id) as the first token: that was the whole answer. No
            # params for a LENGTH end: the prefill worker could not keep the KV.
            if last.finish_reason is FinishReason.STOP:
                first.finish_reason = FinishReason.STOP
                self._finished_at_prefill()
                return first
            self._pool.count_local(LocalReason.PREFILL_FAILED)
        self._start_decode(decode_leg(request, tokens, params))
        return first

    def _start_decode(self, request: EngineRequest) -> None:
        from dynamo_gateway.runtime.pool import Routed

        self._decode = Routed(
            self._pool, self._route, request, self.worker, self._pool.migration_limit
        )

    def _finished_at_prefill(self) -> None:
        """No decode leg: give back the decode worker's share now."""
        self._decode = None
        self._closed = True
        self.worker.view.inflight -= 1
        self._pool.finished(self.request_id)

    async def _end_prefill(self) -> None:
        if not self._prefill_open:
            return
        self._prefill_open = False
        self._pool.prefill_ended(self.request_id, self.prefill)
        leg, self._leg = self._leg, None
        aclose = getattr(leg, "aclose", None)
        if aclose is not None:
            await aclose()

    async def close(self) -> None:
        await self._end_prefill()
        if self._decode is not None:
            decode = self._decode
            params = decode.request_params
            if params is not None and not decode.started:
                # The client left between the legs: the decode worker never saw the
                # handoff, so free the prefill worker's blocks now, not at the timeout.
                await release_abandoned(params)
            await decode.close()
        elif not self._closed:
            self._closed = True
            self.worker.view.inflight -= 1
            self._pool.finished(self.request_id)
