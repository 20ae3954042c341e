"""The continuous-batching scheduler shared by the engines: pure bookkeeping.

No asyncio, no torch, no I/O: a `Scheduler` decides which sequences run in the
next engine step and how many of their tokens, and applies the step's result.
The engines wrap it: the mocker adds a timing model and a word source, the
reference engine a model forward pass and a sampler::

    sched = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs=...,
                      max_num_batched_tokens=..., max_model_len=...)
    sched.add(seq)                      # False: it ended at once (seq.finish_reason)
    plan = sched.schedule()             # who computes what this step
    ...                                 # compute plan.seqs, sample plan.sampling
    finished = sched.complete(plan, sampled_tokens)
    events = sched.drain_events()       # KV events since the last drain

A `Seq` is one request's state: its tokens (prompt, resumed, then generated),
its `KvSequence` in the block pool, how far its KV is computed, and an output
cursor (`take_output()`) with which an engine streams the tokens generated
since the consumer last looked, so that a slow consumer gets them coalesced.
Engines subclass `Seq` to keep their own per-request state in the same object
(one attribute load per token, not a dict lookup).

Between `schedule()` and `complete()` the step is "in flight": an engine may
`finish()` or `abort()` sequences meanwhile (their blocks are freed at once and
`complete()` drops their results), but must not call `schedule()` or `add()`
sequences that could reuse those blocks before the step's compute is done. The
scheduler itself only hands out blocks in `schedule()`, so an engine that
schedules only after the previous step completed is safe.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dynamo_gateway.kv.block_manager import BlockManager, KvSequence
from dynamo_gateway.protocol.engine import EngineOutput, FinishReason, TokenLogprob
from dynamo_gateway.protocol.kv_events import KvEvent, KvEventData, KvSnapshot

__all__ = [
    "KvEventPublisher",
    "Scheduler",
    "Seq",
    "SeqStatus",
    "StepPlan",
]

log = logging.getLogger(__name__)


class SeqStatus(enum.IntEnum):
    NEW = 0  # constructed, not added to a scheduler yet
    WAITING = 1  # queued for admission: new, or preempted and due to recompute its KV
    RUNNING = 2  # holds KV blocks; prefilling (in chunks) or decoding one token per step
    FINISHED = 3  # ended (`finish_reason` set); its blocks are back in the pool
    RECEIVING = 4  # holds KV blocks that a transfer from a prefill worker is filling


# Module-level aliases: the hot loops compare statuses by identity once per token.
_NEW = SeqStatus.NEW
_WAITING = SeqStatus.WAITING
_RUNNING = SeqStatus.RUNNING
_FINISHED = SeqStatus.FINISHED
_RECEIVING = SeqStatus.RECEIVING


class Seq:
    """One request's scheduling state and its output cursor.

    ``tokens`` grows by one per sampled token; ``num_prompt`` of them (prompt plus
    resumed tokens) are input. ``remaining`` is how many tokens it may still
    generate (`Scheduler.add` caps it at the context window). While a step is in
    flight, ``chunk`` tokens from position ``num_computed`` are being computed for
    it, and ``samples`` says whether that chunk reaches its last token, so that the
    step samples a token for it.
    """

    __slots__ = (
        "cached_tokens",
        "chunk",
        "error",
        "export",
        "finish_reason",
        "first_sent",
        "import_params",
        "import_tokens",
        "kv",
        "logprobs",
        "num_computed",
        "num_preemptions",
        "num_prompt",
        "prefilling",
        "remaining",
        "samples",
        "sent",
        "seq_id",
        "status",
        "tokens",
        "transfer_params",
    )

    def __init__(
        self,
        seq_id: str,
        tokens: list[int],
        max_new_tokens: int,
        *,
        logprobs: bool = False,
    ) -> None:
        self.seq_id = seq_id
        self.tokens = tokens  # owned by the Seq from now on: it appends sampled tokens
        self.num_prompt = len(tokens)
        self.remaining = max_new_tokens
        self.status = _NEW
        self.kv = KvSequence()
        self.num_computed = 0  # tokens whose KV is in the cache
        self.prefilling = True  # until its first token is sampled (again after preemption)
        self.chunk = 0
        self.samples = False
        self.num_preemptions = 0
        self.cached_tokens = 0  # prefix-cache hits of the admission that produced output
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        # Output cursor: tokens[sent:] have not been handed out yet.
        self.sent = len(tokens)
        self.first_sent = False
        # One entry per generated token when the request asked for logprobs.
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None
        # Disaggregation. Prefill leg: keep the blocks pinned when it ends after its
        # token (`Scheduler.on_export`); `transfer_params` then go out with the last
        # output. Decode leg: the first `import_tokens` tokens' KV comes from a
        # transfer (`import_params`, the engine's business) instead of a prefill.
        self.export = False
        self.transfer_params: dict[str, Any] | None = None
        self.import_tokens = 0
        self.import_params: Any = None

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.num_prompt :]

    @property
    def start_pos(self) -> int:
        """Position of the first token the step in flight computes."""
        return self.num_computed

    @property
    def step_tokens(self) -> list[int]:
        """The tokens the step in flight computes for this sequence."""
        return self.tokens[self.num_computed : self.num_computed + self.chunk]

    @property
    def has_output(self) -> bool:
        """Whether `take_output()` has something new: tokens or the end."""
        return len(self.tokens) > self.sent or self.finish_reason is not None

    def take_output(self) -> EngineOutput:
        """Everything since the previous call, as one `EngineOutput` delta."""
        tokens = self.tokens
        sent = self.sent
        out = EngineOutput(token_ids=tokens[sent:], finish_reason=self.finish_reason)
        logprobs = self.logprobs
        if logprobs is not None:
            out.logprobs = logprobs[sent - self.num_prompt :]
        self.sent = len(tokens)
        if not self.first_sent:
            self.first_sent = True
            out.cached_tokens = self.cached_tokens
        if self.error is not None:
            out.error = self.error
        if self.transfer_params is not None and self.finish_reason is not None:
            out.kv_transfer_params = self.transfer_params
        return out

    def __repr__(self) -> str:
        return (
            f"Seq({self.seq_id!r}, {self.status.name}, tokens={len(self.tokens)}, "
            f"computed={self.num_computed}, remaining={self.remaining})"
        )


@dataclass(slots=True)
class StepPlan:
    """One engine step, as `Scheduler.schedule()` decided it.

    Every sequence in ``seqs`` computes ``seq.chunk`` tokens (``seq.step_tokens``)
    from position ``seq.num_computed`` into the blocks ``seq.kv.block_ids``. The
    ones in ``sampling`` (same relative order) reach their last known token, so the
    step samples one token for each: the logits rows of the step, in order.
    """

    seqs: list[Seq] = field(default_factory=list)
    sampling: list[Seq] = field(default_factory=list)
    prefill_tokens: int = 0  # new tokens of sequences still prefilling
    decode_blocks: int = 0  # KV blocks held by the step's decoding sequences
    # Ended while scheduling (context full in a full cache, prompt can never fit):
    # their outputs are due now, they are not part of the step.
    finished: list[Seq] = field(default_factory=list)
    num_preempted: int = 0
    # Admitted now with blocks to be filled by a KV transfer (status RECEIVING): the
    # engine starts their pulls and calls `Scheduler.import_done()` for each.
    imports: list[Seq] = field(default_factory=list)


class Scheduler:
    """FIFO continuous batching with chunked prefill and preemption by recompute.

    The block manager's block ids are the rows of the engine's KV cache (real or
    simulated). ``max_model_len`` caps prompt plus generated tokens.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_model_len < 1:
            raise ValueError("scheduler limits must be positive")
        self._blocks = block_manager
        self._max_num_seqs = max_num_seqs
        self._max_batched_tokens = max_num_batched_tokens
        self._max_len = max_model_len
        self._seqs: dict[str, Seq] = {}  # live (waiting or running) sequences by id
        self._waiting: deque[Seq] = deque()
        self._running: list[Seq] = []  # in admission order
        self._receiving: dict[str, Seq] = {}  # admitted, their KV arriving by transfer
        self._num_preemptions = 0
        # Called when a sequence with `export` set ends after sampling, with a second
        # reference to its computed blocks; the callee frees that one when done.
        self.on_export: Callable[[Seq, KvSequence], None] | None = None
        # Called when a sequence due to import KV ends before its transfer started.
        self.on_import_dropped: Callable[[Seq], None] | None = None

    # -- state and load -------------------------------------------------------------------

    @property
    def block_manager(self) -> BlockManager:
        return self._blocks

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_preemptions(self) -> int:
        """Sequences sent back to the waiting queue so far."""
        return self._num_preemptions

    @property
    def num_receiving(self) -> int:
        return len(self._receiving)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def running(self) -> list[Seq]:
        """Running sequences in admission order (a copy)."""
        return list(self._running)

    @property
    def waiting(self) -> list[Seq]:
        """Waiting sequences, the next to be admitted first (a copy)."""
        return list(self._waiting)

    def get(self, seq_id: str) -> Seq | None:
        """The live sequence with this id, if any."""
        return self._seqs.get(seq_id)

    def drain_events(self) -> list[KvEventData]:
        """The block pool's KV events since the last drain, oldest first."""
        return self._blocks.drain_events()

    # -- adding and ending sequences ------------------------------------------------------

    def add(self, seq: Seq) -> bool:
        """Queue a new sequence; False if it ended at once (see ``seq.finish_reason``).

        It ends with LENGTH when it may not generate anything (``remaining`` or the
        context window) and with ERROR when its tokens can never fit the cache.
        """
        if seq.status is not _NEW:
            raise ValueError(f"{seq!r} was already added")
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence {seq.seq_id!r} is already scheduled")
        n = len(seq.tokens)
        if n == 0:
            raise ValueError(f"sequence {seq.seq_id!r} has no tokens")
        seq.remaining = min(seq.remaining, self._max_len - n)
        if seq.remaining <= 0:
            self._end(seq, FinishReason.LENGTH, None)
            return False
        needed = self._blocks.blocks_for(n)
        if needed > self._blocks.num_blocks:
            error = f"prompt needs {needed} KV blocks, the cache has {self._blocks.num_blocks}"
            self._end(seq, FinishReason.ERROR, error)
            return False
        self._seqs[seq.seq_id] = seq
        seq.status = _WAITING
        self._waiting.append(seq)
        return True

    def finish(self, seq: Seq, reason: FinishReason, error: str | None = None) -> bool:
        """End a sequence wherever it is and free its blocks; False if it had ended."""
        status = seq.status
        if status is _FINISHED:
            return False
        if status is _RECEIVING:
            # A transfer is still writing into its blocks: `import_done()` frees them.
            del self._receiving[seq.seq_id]
            self._seqs.pop(seq.seq_id, None)
            self._end(seq, reason, error)
            return True
        if status is _RUNNING:
            self._running.remove(seq)
            if seq.export and reason is FinishReason.LENGTH and self.on_export is not None:
                computed = self._blocks.blocks_for(seq.num_computed)
                self.on_export(seq, self._blocks.share(seq.kv, computed))
        elif status is _WAITING:
            self._waiting.remove(seq)
            if seq.import_tokens and self.on_import_dropped is not None:
                self.on_import_dropped(seq)  # ended before its transfer started
        self._blocks.free(seq.kv)
        if self._seqs.get(seq.seq_id) is seq:  # not another live request of that id
            del self._seqs[seq.seq_id]
        self._end(seq, reason, error)
        return True

    def abort(self, seq_id: str) -> Seq | None:
        """Finish the live sequence `seq_id` with ABORT; returns it (None if unknown)."""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORT)
        return seq

    def finish_all(self, reason: FinishReason, error: str | None = None) -> list[Seq]:
        """End every live sequence (shutdown, engine failure); returns them."""
        seqs = list(self._seqs.values())
        for seq in seqs:
            self.finish(seq, reason, error)
        return seqs

    @staticmethod
    def _end(seq: Seq, reason: FinishReason, error: str | None) -> None:
        seq.status = _FINISHED
        seq.finish_reason = reason
        seq.error = error

    def import_done(self, seq: Seq, ok: bool) -> None:
        """A RECEIVING sequence's transfer ended: it runs on from the imported tokens.

        ``ok`` False (the transfer failed): it prefills what it lacks itself. One
        that ended meanwhile only gets its blocks freed.
        """
        if seq.status is _FINISHED:
            self._blocks.free(seq.kv)
            return
        if seq.status is not _RECEIVING:
            raise ValueError(f"{seq!r} is not receiving KV")
        del self._receiving[seq.seq_id]
        seq.status = _RUNNING
        self._running.append(seq)
        if ok:
            seq.num_computed = max(seq.num_computed, seq.import_tokens)
            # Only the prefill's sampled token is left to compute: that is a decode
            # step (one token of a running sequence), not a prefill chunk.
            seq.prefilling = seq.num_computed < len(seq.tokens) - 1
        seq.import_tokens = 0

    def _preempt(self, seq: Seq) -> None:
        """Send a running sequence back to the head of the queue; it will recompute its KV."""
        self._blocks.free(seq.kv)
        seq.num_computed = 0
        seq.prefilling = True
        seq.status = _WAITING
        seq.num_preemptions += 1
        self._waiting.appendleft(seq)
        self._num_preemptions += 1

    # -- one step -------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Pick the next step's work.

        Algorithm: a token budget of ``max_num_batched_tokens`` is spent in three
        passes. (1) Every decoding sequence, oldest first, gets one token; if its
        next token needs a block and none is free, the most recently admitted
        running sequence is preempted (blocks freed, pushed to the front of the
        waiting queue) until the block fits; a sequence alone in a full cache
        finishes with LENGTH, since its context can never grow. (2) Sequences still
        prefilling get chunks of their remaining tokens, in admission order.
        (3) Unless (1) preempted, the waiting queue is admitted strictly FIFO while
        budget, ``max_num_seqs`` and blocks allow (blocks for all known tokens, the
        cached prefix reused, one spare block kept while others run); the head
        never gets overtaken, so nobody starves, and the oldest running sequence
        always progresses, so preemption cannot livelock.

        A preempted sequence keeps its tokens, generated ones included, and
        prefills all of them again when it is readmitted (recompute), so what it
        generates does not change.
        """
        plan = StepPlan()
        batch = plan.seqs
        sampling = plan.sampling
        budget = self._max_batched_tokens
        blocks = self._blocks
        bs = blocks.block_size
        running = self._running
        decode_blocks = 0
        prefill_tokens = 0
        preempted_before = self._num_preemptions

        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            i += 1
            if seq.prefilling:
                continue
            kv = seq.kv
            # Its next token needs a new block: grow, else preempt others for one.
            needs_block = seq.num_computed >= len(kv.block_ids) * bs
            if (
                needs_block
                and not blocks.append_slots(kv, seq.num_computed + 1)
                and not self._make_room(seq, plan)
            ):
                continue
            seq.chunk = 1
            seq.samples = True
            budget -= 1
            decode_blocks += len(kv.block_ids)
            batch.append(seq)
            sampling.append(seq)
        preempted = self._num_preemptions != preempted_before

        for seq in running:
            if budget <= 0:
                break
            if seq.prefilling:
                chunk = _take_chunk(seq, budget, batch, sampling)
                budget -= chunk
                prefill_tokens += chunk

        waiting = self._waiting
        receiving = self._receiving
        while (
            not preempted
            and waiting
            and budget > 0
            and len(running) + len(receiving) < self._max_num_seqs
        ):
            seq = waiting[0]
            busy = bool(running or receiving)
            if not blocks.allocate(seq.kv, seq.tokens, reserve=1 if busy else 0):
                if busy:
                    break
                # An empty cache can't hold it: it never will (add() checks this too).
                self.finish(seq, FinishReason.ERROR, "prompt does not fit the KV cache")
                plan.finished.append(seq)
                continue
            waiting.popleft()
            cached = seq.kv.num_cached_tokens
            seq.num_computed = cached
            if not seq.first_sent:
                seq.cached_tokens = cached
            if seq.import_tokens:
                seq.status = _RECEIVING
                receiving[seq.seq_id] = seq
                plan.imports.append(seq)
                continue
            seq.status = _RUNNING
            running.append(seq)
            chunk = _take_chunk(seq, budget, batch, sampling)
            budget -= chunk
            prefill_tokens += chunk
        plan.prefill_tokens = prefill_tokens
        plan.decode_blocks = decode_blocks
        plan.num_preempted = self._num_preemptions - preempted_before
        return plan

    def _make_room(self, seq: Seq, plan: StepPlan) -> bool:
        """Preempt the newest running sequences until `seq` gets its next block."""
        running = self._running
        while True:
            if len(running) == 1:
                self.finish(seq, FinishReason.LENGTH)
                plan.finished.append(seq)
                return False
            victim = running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
            if self._blocks.append_slots(seq.kv, seq.num_computed + 1):
                return True

    def complete(
        self,
        plan: StepPlan,
        sampled: Sequence[int],
        stops: Sequence[FinishReason | None] | None = None,
    ) -> list[Seq]:
        """Apply a computed step; returns the sequences it finished.

        ``sampled[i]`` is the token sampled for ``plan.sampling[i]``; ``stops[i]``,
        if given, ends that sequence after the token (an engine's stop rule: EOS, a
        stop token id), taking precedence over LENGTH. Sequences that ended while
        the step was in flight are skipped, their results dropped. Every computed
        block that filled up is committed to the prefix cache.
        """
        if len(sampled) != len(plan.sampling):
            raise ValueError(f"{len(sampled)} tokens for {len(plan.sampling)} sampling sequences")
        blocks = self._blocks
        bs = blocks.block_size
        max_len = self._max_len
        running = _RUNNING  # a local: this loop runs once per token
        finished: list[Seq] = []
        j = 0
        token = 0
        stop: FinishReason | None = None
        for seq in plan.seqs:
            samples = seq.samples
            if samples:
                token = sampled[j]
                if stops is not None:
                    stop = stops[j]
                j += 1
            if seq.status is not running:
                continue  # ended while the step ran
            num_computed = seq.num_computed + seq.chunk
            seq.num_computed = num_computed
            kv = seq.kv
            # Only a block that just filled up needs committing (a cheap test per token).
            fills_block = num_computed >= (kv.num_registered + 1) * bs
            if not samples:
                if fills_block:
                    blocks.commit(kv, seq.tokens, num_computed)
                continue
            seq.prefilling = False
            tokens = seq.tokens
            tokens.append(token)
            seq.remaining -= 1
            if fills_block:
                blocks.commit(kv, tokens, num_computed)
            if stop is not None:
                self.finish(seq, stop)
                finished.append(seq)
            elif seq.remaining <= 0 or len(tokens) >= max_len:
                self.finish(seq, FinishReason.LENGTH)
                finished.append(seq)
        return finished


class KvEventPublisher:
    """Numbers one worker's KV events from 1 and hands them to its sink.

    A failing sink is logged and skipped: serving goes on, and consumers see the
    gap in event ids and ask for a full dump (`snapshot()`).
    """

    __slots__ = ("_event_id", "_sink", "_worker_id")

    def __init__(self, worker_id: str, sink: Callable[[KvEvent], None] | None) -> None:
        self._worker_id = worker_id
        self._sink = sink
        self._event_id = 0

    @property
    def enabled(self) -> bool:
        return self._sink is not None

    @property
    def last_event_id(self) -> int:
        return self._event_id

    def publish(self, events: list[KvEventData]) -> None:
        sink = self._sink
        if not events or sink is None:
            return
        for data in events:
            self._event_id += 1
            try:
                sink(KvEvent(worker_id=self._worker_id, event_id=self._event_id, data=data))
            except Exception:
                log.exception("worker %s: publishing a KV event failed", self._worker_id)

    def snapshot(self, block_manager: BlockManager) -> KvSnapshot:
        """A dump of `block_manager`'s prefix cache, consistent with the published ids.

        The pool may hold events not drained yet (a step in flight already evicted
        blocks for its new ones): they are published first, so the snapshot
        reflects exactly the events up to `last_event_id`. Call it on the thread
        that changes the pool, between two of its calls (as every drain is).
        """
        self.publish(block_manager.drain_events())
        return KvSnapshot(
            worker_id=self._worker_id,
            event_id=self._event_id,
            blocks=block_manager.snapshot(),
        )


def _take_chunk(seq: Seq, budget: int, batch: list[Seq], sampling: list[Seq]) -> int:
    """Give a prefilling sequence the next chunk of its prompt (at most `budget` tokens).

    It samples this step only if the chunk finishes its known tokens.
    """
    left = len(seq.tokens) - seq.num_computed
    chunk = left if left <= budget else budget
    seq.chunk = chunk
    seq.samples = chunk == left
    batch.append(seq)
    if seq.samples:
        sampling.append(seq)
    return chunk
