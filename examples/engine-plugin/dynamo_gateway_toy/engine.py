"""A toy engine that keeps the whole `Engine` contract without a model.

Its "model" is a formula: the candidates for the next token are four ids
computed from the last token and the position, with probabilities 0.5, 0.25,
0.15 and 0.1; greedy takes the first. Some positions make EOS the first
candidate, so EOS, ``ignore_eos`` and ``min_tokens`` have something to do.

It still behaves like a paged engine where the gateway can see it: prompts are
cut into blocks of ``cache.block_size`` tokens, the full ones are kept in an
LRU prefix cache of ``cache.num_kv_blocks`` blocks keyed by
`dynamo_gateway.kv.hashing` sequence hashes, a repeated prefix is reported in
``cached_tokens``, and every block stored or evicted is published as a KV
event (``kv_snapshot()`` dumps the cache). One request is one async
generator producing a token per ``plugin_config.toy.step_s`` seconds.

It has no logits to bias or mask, so it refuses requests with a
``SamplingParams.constraint`` or ``logit_bias`` (`InvalidRequestError`, a 400)
rather than ignoring them, as an engine that cannot enforce them must.

Options (``[plugin_config.toy]`` in TOML, or ``plugin_config={"toy": {...}}``):
``step_s`` (default 0.001).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dynamo_gateway.engines.base import EngineBase, EngineContext, EngineState
from dynamo_gateway.errors import EngineError, InvalidRequestError
from dynamo_gateway.kv.hashing import sequence_hashes
from dynamo_gateway.protocol.engine import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    LoadMetrics,
    SamplingParams,
    TokenLogprob,
)
from dynamo_gateway.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventData,
    KvSnapshot,
)

__all__ = ["ToyEngine"]

PROBS = (0.5, 0.25, 0.15, 0.1)  # the candidates' probabilities, most likely first
DEFAULT_BLOCKS = 1024


@dataclass
class _Block:
    parent: int | None
    tokens: list[int]
    refs: int = 0  # live requests using it; only unreferenced blocks are evicted


@dataclass
class _Running:
    tokens: int  # prompt + generated so far, for load()
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


class ToyEngine(EngineBase):
    """See the module docstring."""

    def __init__(self, context: EngineContext) -> None:
        settings = context.settings
        options = settings.plugin_config.get("toy", {})
        self._step_s = float(options.get("step_s", 0.001))
        self._context = context
        self._block_size = settings.cache.block_size
        self._capacity = settings.cache.num_kv_blocks or DEFAULT_BLOCKS
        self._vocab = context.model.vocab_size or 32000
        self._eos = tuple(context.model.eos_token_ids)
        self._state = EngineState.CREATED
        self._running: dict[str, _Running] = {}
        # sequence hash -> block, least recently used first
        self._cache: OrderedDict[int, _Block] = OrderedDict()
        self._event_id = 0

    # -- the Engine protocol ----------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def block_size(self) -> int:
        return self._block_size

    async def start(self) -> None:
        self._state = EngineState.RUNNING

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self._state is not EngineState.RUNNING:
            raise EngineError(f"the toy engine is {self._state.value}")
        rid = request.request_id
        if rid in self._running:
            raise EngineError(f"request {rid!r} is already running")
        sampling = request.sampling
        # Refused before anything is allocated: serving them unenforced would be wrong.
        if sampling.constraint is not None:
            raise InvalidRequestError(
                "the toy engine does not support structured output", param="response_format"
            )
        if sampling.logit_bias:
            raise InvalidRequestError(
                "the toy engine does not support logit_bias", param="logit_bias"
            )
        # Resumed tokens were streamed already: part of the prompt now, and they count
        # towards max_tokens, which is the whole completion's length.
        seq = [*request.prompt_token_ids, *request.resumed_token_ids]
        if not seq:
            raise EngineError(f"request {rid!r} has an empty prompt")
        generated = len(request.resumed_token_ids)
        running = self._running[rid] = _Running(len(seq))
        hashes, cached = self._prefill(seq)
        rng = random.Random(sampling.seed)
        stops = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stops.update(self._eos)
        try:
            first = True
            while True:
                if generated >= sampling.max_tokens:
                    # Nothing left to generate (a resume at the limit).
                    yield EngineOutput(
                        token_ids=[],
                        finish_reason=FinishReason.LENGTH,
                        cached_tokens=cached if first else None,
                    )
                    return
                await asyncio.sleep(self._step_s)  # one engine step
                if running.aborted.is_set():
                    yield EngineOutput(
                        token_ids=[],
                        finish_reason=FinishReason.ABORT,
                        cached_tokens=cached if first else None,
                    )
                    return
                token, logprob = self._sample(seq, sampling, generated, stops, rng)
                seq.append(token)
                generated += 1
                running.tokens += 1
                finish: FinishReason | None = None
                if token in stops:
                    finish = FinishReason.STOP
                elif generated >= sampling.max_tokens:
                    finish = FinishReason.LENGTH
                yield EngineOutput(
                    token_ids=[token],
                    finish_reason=finish,
                    cached_tokens=cached if first else None,
                    logprobs=[logprob] if logprob is not None else None,
                )
                first = False
                if finish is not None:
                    return
        finally:
            # A normal end, abort(), or the consumer closing the stream early: the
            # request never outlives its stream.
            del self._running[rid]
            self._release(hashes)

    async def abort(self, request_id: str) -> None:
        running = self._running.get(request_id)
        if running is not None:  # unknown and finished ids are ignored
            running.aborted.set()

    async def check_health(self) -> None:
        if self._state is not EngineState.RUNNING:
            raise EngineError(f"the toy engine is {self._state.value}")

    def load(self) -> LoadMetrics:
        bs = self._block_size
        return LoadMetrics(
            active_requests=len(self._running),
            kv_blocks_used=sum(math.ceil(r.tokens / bs) for r in self._running.values()),
            kv_blocks_total=self._capacity,
        )

    async def aclose(self) -> None:
        if self._state is EngineState.STOPPED:
            return
        self._state = EngineState.STOPPED
        for running in self._running.values():
            running.aborted.set()
        if self._cache:
            self._cache.clear()
            self._publish(AllBlocksCleared())

    # -- KV snapshots (optional, see dynamo_gateway.engines.base) ----------------------

    def kv_snapshot(self) -> KvSnapshot:
        """Every cached block, as of the last published event (parents first)."""
        blocks = [
            BlockStored(
                block_hashes=[h],
                parent_block_hash=b.parent,
                token_ids=list(b.tokens),
                block_size=self._block_size,
            )
            for h, b in self._cache.items()
        ]
        return KvSnapshot(worker_id=self._context.worker_id, event_id=self._event_id, blocks=blocks)

    # -- the "model" ------------------------------------------------------------------

    def _candidates(self, seq: list[int]) -> list[int]:
        base = (31 * seq[-1] + 7 * len(seq) + 11) % self._vocab
        if self._eos and base < self._vocab // 64:
            base = self._eos[0]  # the toy model "wants to stop" here
        out = [base]
        for j in range(1, len(PROBS)):
            out.append((base + 97 * j) % self._vocab)
        return out

    def _sample(
        self,
        seq: list[int],
        sampling: SamplingParams,
        generated: int,
        stops: set[int],
        rng: random.Random,
    ) -> tuple[int, TokenLogprob | None]:
        candidates = list(zip(self._candidates(seq), PROBS, strict=True))
        if generated < sampling.min_tokens:
            # Stop ids may not end the request before min_tokens: masked out.
            candidates = [(t, p) for t, p in candidates if t not in stops] or [(0, 1.0)]
        if sampling.temperature > 0:
            token = rng.choices([t for t, _ in candidates], [p for _, p in candidates])[0]
        else:
            token = candidates[0][0]
        if sampling.logprobs is None:
            return token, None
        logp = {t: math.log(p) for t, p in candidates}
        top = [(t, logp[t]) for t, _ in candidates[: sampling.logprobs]]
        return token, TokenLogprob(token, logp[token], top)

    # -- the prefix cache -------------------------------------------------------------

    def _prefill(self, seq: list[int]) -> tuple[list[int], int]:
        """Look the prompt's full blocks up, store the missing ones; returns the
        blocks this request holds and how many prompt tokens came from the cache."""
        bs = self._block_size
        hashes = sequence_hashes(seq, bs)
        # At least one prompt token is always computed (it yields the first logits).
        usable = (len(seq) - 1) // bs
        hit = 0
        while hit < min(usable, len(hashes)) and hashes[hit] in self._cache:
            hit += 1
        new = [h for h in hashes if h not in self._cache]
        self._evict(len(new))
        stored_from: int | None = None
        for i, h in enumerate(hashes):
            block = self._cache.get(h)
            if block is None:
                parent = hashes[i - 1] if i else None
                block = self._cache[h] = _Block(parent, seq[i * bs : (i + 1) * bs])
                stored_from = i if stored_from is None else stored_from
            block.refs += 1
            self._cache.move_to_end(h)
        if stored_from is not None:
            self._publish(
                BlockStored(
                    block_hashes=hashes[stored_from:],
                    parent_block_hash=hashes[stored_from - 1] if stored_from else None,
                    token_ids=seq[stored_from * bs : len(hashes) * bs],
                    block_size=bs,
                )
            )
        return hashes, hit * bs

    def _release(self, hashes: list[int]) -> None:
        for h in hashes:
            block = self._cache.get(h)
            if block is not None:
                block.refs -= 1

    def _evict(self, room: int) -> None:
        excess = len(self._cache) + room - self._capacity
        if excess <= 0:
            return
        gone = [h for h, b in self._cache.items() if b.refs == 0][:excess]
        for h in gone:
            del self._cache[h]
        if gone:
            self._publish(BlockRemoved(block_hashes=gone))

    def _publish(self, data: KvEventData) -> None:
        sink = self._context.publish_kv_event
        if sink is None:
            return
        self._event_id += 1
        sink(KvEvent(worker_id=self._context.worker_id, event_id=self._event_id, data=data))
